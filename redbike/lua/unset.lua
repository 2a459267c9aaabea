-- unset.lua: forget a job. A running job completes but is not placed again
-- (the resources it holds are released when it ends). The occurrences it
-- leaves unrun are cancelled (see cancel_waiting() in lib.lua).
-- KEYS: the job-state keys (lib.lua), then the job's queue.
-- ARGV: the common four, then jobid, who unset it (for the trail), the
--       occurrence the caller found the job placed for ('' if none), the
--       count of its schedule's occurrences due after that one until now.
-- Returns 0 (no such job), 1 (removed) or 2 (running: removed when it ends).
local jobid, by, expected, missed = ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 3], ARGV[L.A + 4]
if type(by) ~= 'string' or string.find(by, '[|%c]') then return L.bad('unset by', by) end
if expected ~= '' and not L.time_of(expected) then return L.bad('expected due', expected) end
if not L.int_of(missed, 0, L.MAX_TIME) then return L.bad('missed count', missed) end
local status = redis.call('HGET', L.STATUSES, jobid)
if redis.call('HEXISTS', L.SCHEDULES, jobid) == 0 and not status then
  return 0
end
local running = redis.call('HEXISTS', L.LEASES, jobid) == 1
local record = L.job_of(jobid)
if running then
  L.drop_pending(jobid, record, '', expected, missed)
else
  L.cancel_waiting(jobid, record, expected, missed, status)
  L.unplace(jobid, KEYS[L.K + 1])
end
L.note(record, 'unset', by)
L.forget(jobid, record)
L.save_job(jobid, record)
if running then return 2 end
return 1
