-- reap.lua: end the runs whose lease deadline passed (their worker died or
-- stopped renewing) and put the jobs back (retried, or by their schedules).
-- KEYS: the job-state keys, then the queues named by this batch.
-- ARGV: the common four, then leader token, queue count n, the n queue
--       channels, then per lease 6 values: jobid, token, the placement,
--       error JSON, how many occurrences already due the placement fires
--       (see finish.lua), 1-based queue index.
-- A lease renewed or ended meanwhile is left alone; a deadline left without
-- its lease is dropped. Returns the job ids reaped.
local failed, n = L.batch_error(6, 'lease values')
if failed then return failed end
local placements = {} -- by the index of the lease's first value: parsed once, by the checks
for j = L.A + 3 + n, #ARGV, 6 do
  failed, placements[j] = L.finish_error(ARGV[j], ARGV[j + 1], ARGV[j + 2], ARGV[j + 3], ARGV[j + 4])
  if failed then return failed end
  if not L.int_of(ARGV[j + 5], 1, n) then return L.bad('queue index', ARGV[j + 5]) end
end
local reaped = {}
for j = L.A + 3 + n, #ARGV, 6 do
  local jobid = ARGV[j]
  local deadline = redis.call('ZSCORE', L.DEADLINES, jobid)
  if deadline and tonumber(deadline) <= L.NOW_N then
    local qi = tonumber(ARGV[j + 5])
    local done = L.finish(jobid, ARGV[j + 1], placements[j], ARGV[j + 3], KEYS[L.K + qi],
      ARGV[L.A + 2 + qi], ARGV[j + 4], true)
    if done == 'DONE' or done == 'GONE' then
      table.insert(reaped, jobid)
    elseif redis.call('HEXISTS', L.LEASES, jobid) == 0 then
      redis.call('ZREM', L.DEADLINES, jobid)
    end
  end
end
return reaped
