-- revoke.lua: end runs that must stop before their lease runs out (tasks of
-- the node model orphaned longer than kill-orphans-after), as the reaper ends
-- an expired one, and place their jobs (an orphan was unset: it is released
-- and forgotten). The worker's heartbeat then finds the lease gone and kills
-- the run.
-- KEYS: the job-state keys, then the queues named by this batch.
-- ARGV: the common four, then queue count n, the n queue channels, then per
--       run 5 values: jobid, lease token, the placement, error JSON, 1-based
--       queue index.
-- A run that ended meanwhile (its token no longer holds the lease) is left
-- alone. Returns the job ids whose run it ended.
local n = L.int_of(ARGV[L.A + 1], 0, #KEYS - L.K)
if not n or n ~= #KEYS - L.K then return L.bad('queue count', ARGV[L.A + 1]) end
if (#ARGV - L.A - 1 - n) % 5 ~= 0 then return L.bad('count of run values', #ARGV) end
local placements = {} -- by the index of the run's first value: parsed once, by the checks
for j = L.A + 2 + n, #ARGV, 5 do
  local failed
  failed, placements[j] = L.finish_error(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], '0')
  if failed then return failed end
  if not L.int_of(ARGV[j + 4], 1, n) then return L.bad('queue index', ARGV[j + 4]) end
end
local ended = {}
for j = L.A + 2 + n, #ARGV, 5 do
  local qi = tonumber(ARGV[j + 4])
  local done = L.finish(ARGV[j], ARGV[j + 1], placements[j], ARGV[j + 3], KEYS[L.K + qi],
    ARGV[L.A + 1 + qi], '0', true)
  if done ~= 'STALE' then table.insert(ended, ARGV[j]) end
end
return ended
