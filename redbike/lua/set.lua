-- set.lua: give a job a schedule and place it, atomically.
-- KEYS: the nine job-state keys (lib.lua), KEYS[10] = the job's queue.
-- ARGV: now, dispatcher channel, jobid, schedule, kind, at, status,
--       queue channel, only_if_new ('1': leave an existing job untouched).
-- Returns 'KEPT', 'PENDING' (the job is running: the placement waits for the
-- run to end) or 'PLACED'.
local jobid, schedule, kind, at, status, channel, only_if_new =
  ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local queue = KEYS[10]
if only_if_new == '1' and redis.call('HEXISTS', SCHEDULES, jobid) == 1 then
  return 'KEPT'
end
redis.call('HSET', SCHEDULES, jobid, schedule)
if redis.call('HEXISTS', LEASES, jobid) == 1 then
  redis.call('HSET', PENDING, jobid, kind .. '|' .. at .. '|' .. status)
  return 'PENDING'
end
local current = redis.call('HGET', STATUSES, jobid)
if kind == 'Q' and current and string.sub(current, 1, 4) == 'ENQ:' then
  return 'PLACED' -- already queued: keep its place in line
end
unplace(jobid, queue)
local failed = place(jobid, kind, at, status, queue, channel)
if failed then return failed end
return 'PLACED'
