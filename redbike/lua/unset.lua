-- unset.lua: forget jobs (one: redbike unset; many of a queue: unset_many).
-- A running job completes but is not placed again (the resources it holds are
-- released when it ends). The occurrences it leaves unrun are cancelled (see
-- cancel_waiting() in lib.lua).
-- KEYS: the job-state keys (lib.lua), then the jobs' queue.
-- ARGV: the common four, then who unset them (for the trail), then per job
--       3 values: jobid, the occurrence the caller found the job placed for
--       ('' if none), the count of its schedule's occurrences due after that
--       one until now.
-- Returns a list, a result per job: 0 (no such job), 1 (removed) or 2
-- (running: removed when it ends). A bad value of any job refuses the call,
-- before anything is written.
local by, first_job, job_values = ARGV[L.A + 1], L.A + 2, 3
if not by or string.find(by, '[|%c]') then return L.bad('unset by', by) end
if (#ARGV - first_job + 1) % job_values ~= 0 then return L.bad('count of job values', #ARGV - first_job + 1) end
for base = first_job, #ARGV, job_values do
  local expected, missed = ARGV[base + 1], ARGV[base + 2]
  if expected ~= '' and not L.time_of(expected) then return L.bad('expected due', expected) end
  if not L.int_of(missed, 0, L.MAX_TIME) then return L.bad('missed count', missed) end
end

local function unset_job(jobid, expected, missed)
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
end

local results = {}
for base = first_job, #ARGV, job_values do
  results[#results + 1] = unset_job(ARGV[base], ARGV[base + 1], ARGV[base + 2])
end
return results
