-- unset.lua: forget a job. A running job completes but is not placed again
-- (the resources it holds are released when it ends). An occurrence it
-- waited for in the timeline is cancelled (the ledger counts it).
-- KEYS: the job-state keys (lib.lua), then the job's queue.
-- ARGV: the common five, then jobid, who unset it (for the trail).
-- Returns 0 (no such job), 1 (removed) or 2 (running: removed when it ends).
local jobid, by = ARGV[L.A + 1], ARGV[L.A + 2]
if redis.call('HEXISTS', L.SCHEDULES, jobid) == 0 and redis.call('HEXISTS', L.STATUSES, jobid) == 0 then
  return 0
end
local running = redis.call('HEXISTS', L.LEASES, jobid) == 1
if not running then
  L.cancel_waiting(jobid)
  L.unplace(jobid, KEYS[L.K + 1])
end
L.forget(jobid)
L.trail(jobid, 'unset', by)
if running then return 2 end
return 1
