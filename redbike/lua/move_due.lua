-- move_due.lua: fire the occurrences that fell due: move their jobs from the
-- timeline into their queues (or, for a job the misfire policy skipped, back
-- to the timeline at its next occurrence), writing the ledger as it goes.
-- KEYS: the job-state keys, then the queues named by this batch.
-- ARGV: the common four, then leader token, queue count n, the n queue
--       channels, then per job 4 values: jobid, 1-based queue index, the
--       timeline score the dispatcher read, the placement.
-- A job no longer at that score (unset, set again) is skipped: no occurrence
-- fires twice, nor one that is no longer scheduled. Returns the count placed.
local failed, n = L.batch_error(4, 'job values')
if failed then return failed end
local placements = {} -- by the index of the job's first value: parsed once, by the checks
for j = L.A + 3 + n, #ARGV, 4 do
  if ARGV[j] == '' then return L.bad('job id', ARGV[j]) end
  if not L.int_of(ARGV[j + 1], 1, n) then return L.bad('queue index', ARGV[j + 1]) end
  if not L.time_of(ARGV[j + 2]) then return L.bad('timeline score', ARGV[j + 2]) end
  failed, placements[j] = L.placement_error(ARGV[j + 3])
  if failed then return failed end
end
local moved = 0
for j = L.A + 3 + n, #ARGV, 4 do
  local jobid = ARGV[j]
  local score = redis.call('ZSCORE', L.TIMELINE, jobid)
  if score and tonumber(score) == tonumber(ARGV[j + 2]) and tonumber(score) <= L.NOW_N then
    local qi = tonumber(ARGV[j + 1])
    redis.call('ZREM', L.TIMELINE, jobid)
    L.place(jobid, placements[j], KEYS[L.K + qi], ARGV[L.A + 2 + qi])
    moved = moved + 1
  end
end
return moved
