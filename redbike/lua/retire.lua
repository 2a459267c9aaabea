-- retire.lua: remove what is left of the jobs that ended for good (one-offs
-- that ran or were skipped, unset jobs) keep-finished seconds ago: their
-- status, schedule, record (the ledger and the trail), payload. A job set again since is
-- only taken off the list; one still running (unset while it ran) goes back
-- on it, to wait another keep-finished.
-- KEYS: the job-state keys.
-- ARGV: the common four, then leader token, cutoff (ended at or before it),
--       most jobs to look at.
-- Returns how many it took off the list (call again while that is the most).
local failed = L.fence(ARGV[L.A + 1])
if failed then return failed end
local cutoff, most = L.time_of(ARGV[L.A + 2]), L.int_of(ARGV[L.A + 3], 1, L.WAKE_BATCH)
if not cutoff then return L.bad('cutoff', ARGV[L.A + 2]) end
if not most then return L.bad('batch size', ARGV[L.A + 3]) end
local taken = 0
while taken < most do
  local head = redis.call('LINDEX', L.FINISHED, 0)
  local at, jobid = string.match(head or '', '^([^|]*)|(.*)$')
  if not at or (tonumber(at) or 0) > cutoff then break end
  redis.call('LPOP', L.FINISHED)
  taken = taken + 1
  local status = redis.call('HGET', L.STATUSES, jobid)
  local kind = status and string.sub(status, 1, 4)
  if redis.call('HEXISTS', L.LEASES, jobid) == 1 then
    L.finished(jobid)
  elseif not status or kind == 'END:' or kind == 'SKP:' then -- not set again since
    for _, key in ipairs({L.SCHEDULES, L.STATUSES, L.ERRORS, L.JOBS, L.DATA}) do
      redis.call('HDEL', key, jobid)
    end
  end
end
return taken
