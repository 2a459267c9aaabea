-- unset.lua: forget a job. A running job completes but is not placed again.
-- KEYS: the nine job-state keys (lib.lua), KEYS[10] = the job's queue.
-- ARGV: now, dispatcher channel, jobid.
-- Returns 0 (no such job), 1 (removed) or 2 (running: removed when it ends).
local jobid = ARGV[3]
if redis.call('HEXISTS', SCHEDULES, jobid) == 0 and redis.call('HEXISTS', STATUSES, jobid) == 0 then
  return 0
end
local running = redis.call('HEXISTS', LEASES, jobid) == 1
if not running then
  unplace(jobid, KEYS[10])
end
redis.call('HDEL', SCHEDULES, jobid)
redis.call('HDEL', STATUSES, jobid)
redis.call('HDEL', PENDING, jobid)
redis.call('HDEL', ERRORS, jobid)
if running then return 2 end
return 1
