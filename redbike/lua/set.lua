-- set.lua: give a job a schedule (and needs) and place it, atomically.
-- KEYS: the job-state keys (lib.lua), then the job's queue.
-- ARGV: the common three, then jobid, schedule, kind, at, status, queue
--       channel, only_if_new ('1': leave an existing job untouched; 'S': leave
--       it untouched if its schedule is this one; '0': set it), needs
--       ("resource=amount,...", '' to keep the stored needs, 'none' to drop them).
-- Returns 'KEPT', 'PENDING' (the job is running: the placement waits for the
-- run to end) or 'PLACED'.
local jobid, schedule, kind, at, status, channel, only_if_new, needs =
  ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 3], ARGV[L.A + 4], ARGV[L.A + 5], ARGV[L.A + 6], ARGV[L.A + 7], ARGV[L.A + 8]
local queue = KEYS[L.K + 1]
if not L.is_name(jobid) then return L.bad('job id', jobid) end
local failed = L.placement_error(kind, at, status)
if failed then return failed end
if only_if_new ~= '0' and only_if_new ~= '1' and only_if_new ~= 'S' then
  return L.bad('only_if_new', only_if_new)
end
if needs ~= L.CLEAR_NEEDS and not L.is_amounts(needs, 1, L.MAX_AMOUNT) then return L.bad('needs', needs) end
if (only_if_new == '1' and redis.call('HEXISTS', L.SCHEDULES, jobid) == 1)
    or (only_if_new == 'S' and redis.call('HGET', L.SCHEDULES, jobid) == schedule) then
  return 'KEPT'
end
redis.call('HSET', L.SCHEDULES, jobid, schedule)
local needs_before = redis.call('HGET', L.NEEDS, jobid) or ''
if needs == '' then
  needs = needs_before -- none given: the job keeps what it needs
elseif needs == L.CLEAR_NEEDS then
  needs = '' -- given as none: it needs nothing
end
if needs ~= '' then
  redis.call('HSET', L.NEEDS, jobid, needs)
else
  redis.call('HDEL', L.NEEDS, jobid)
end
if redis.call('HEXISTS', L.LEASES, jobid) == 1 then
  redis.call('HSET', L.PENDING, jobid, kind .. '|' .. at .. '|' .. status)
  return 'PENDING'
end
local current = redis.call('HGET', L.STATUSES, jobid)
if kind == 'Q' and current and string.sub(current, 1, 4) == 'ENQ:'
    and (needs == needs_before or redis.call('HEXISTS', L.PARKING, jobid) == 0) then
  return 'PLACED' -- already queued: keep its place in line (a job in line for a
  -- resource whose needs changed goes to the back of its queue instead)
end
L.unplace(jobid, queue)
failed = L.place(jobid, kind, at, status, queue, channel)
if failed then return failed end
return 'PLACED'
