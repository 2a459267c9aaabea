-- set.lua: give jobs a schedule (needs, misfire policy, retries) and place
-- them, atomically: one job (redbike set) or many that share a schedule and
-- queue (Redbike.set_alike: a feed's batch, a reconciler's new tasks), where
-- one call for many saves each job the call's own cost (about half of what a
-- job costs Redis: the EVALSHA, the library, the common checks).
-- KEYS: the job-state keys (lib.lua), then the jobs' queue.
-- ARGV: the common four, then schedule, the placement, queue
--       channel, only_if ('1': leave an existing job untouched; 'S': leave it
--       untouched if its schedule is this one; 'R': only if it failed (status
--       DIE: the retry command); '0': set it), misfire policy ('' to keep the
--       job's), the default misfire policy (for a new job), retries ('' to
--       keep the job's), the default retries, who set it (for the trail), then
--       per job 5 values: jobid, needs ("resource=amount,...", or one
--       such per alternative path joined by " ",
--       '' to keep the stored needs, 'none' to drop them), the occurrence the
--       caller found the job placed for ('' if none), the count of its
--       schedule's occurrences due after that one until now (see
--       cancel_waiting() in lib.lua), the payload (JSON; '' keeps the job's,
--       'null' drops it: records.encode_data).
-- Returns a list, a result per job: 'KEPT', 'PENDING' (the job is running:
-- the placement waits for the run to end) or 'PLACED'. A bad value of any
-- job refuses the call, before anything is written.
local schedule, placement, channel, only_if, misfire, default_misfire, retries, default_retries, by =
  ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 3], ARGV[L.A + 4], ARGV[L.A + 5], ARGV[L.A + 6], ARGV[L.A + 7],
  ARGV[L.A + 8], ARGV[L.A + 9]
local first_job, job_values = L.A + 10, 5
local queue = KEYS[L.K + 1]
local failed, p = L.placement_error(placement)
if failed then return failed end
if only_if ~= '0' and only_if ~= '1' and only_if ~= 'S' and only_if ~= 'R' then
  return L.bad('only_if', only_if)
end
if misfire ~= '' and not L.is_misfire(misfire) then return L.bad('misfire policy', misfire) end
if not L.is_misfire(default_misfire) then return L.bad('default misfire policy', default_misfire) end
if retries ~= '' and not L.int_of(retries, 0, L.MAX_AMOUNT) then return L.bad('retries', retries) end
if not L.int_of(default_retries, 0, L.MAX_AMOUNT) then return L.bad('default retries', default_retries) end
if not by or string.find(by, '[|%c]') then return L.bad('set by', by) end
-- Needs: plain, or one needs text per alternative path (replicas:
-- records.encode_alternatives), none empty, at most MAX_PATHS.
local function is_needs(text)
  if not string.find(text, L.ALTERNATIVES_SEP, 1, true) then return L.is_amounts(text, 1, L.MAX_AMOUNT) end
  local count = 0
  for path in string.gmatch(text .. L.ALTERNATIVES_SEP, '([^' .. L.ALTERNATIVES_SEP .. ']*)' .. L.ALTERNATIVES_SEP) do
    if path == '' or not L.is_amounts(path, 1, L.MAX_AMOUNT) then return false end
    count = count + 1
  end
  return count <= L.MAX_PATHS
end
if (#ARGV - first_job + 1) % job_values ~= 0 then return L.bad('count of job values', #ARGV - first_job + 1) end
for base = first_job, #ARGV, job_values do
  local jobid, needs, expected, missed = ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  if not L.is_name(jobid) then return L.bad('job id', jobid) end
  if needs ~= L.CLEAR_NEEDS and not is_needs(needs) then return L.bad('needs', needs) end
  if expected ~= '' and not L.time_of(expected) then return L.bad('expected due', expected) end
  if not L.int_of(missed, 0, L.MAX_TIME) then return L.bad('missed count', missed) end
  if not ARGV[base + 4] then return L.bad('payload', ARGV[base + 4]) end
end

local function set_job(jobid, needs, expected, missed, data)
  if (only_if == '1' and redis.call('HEXISTS', L.SCHEDULES, jobid) == 1)
      or (only_if == 'S' and redis.call('HGET', L.SCHEDULES, jobid) == schedule) then
    return 'KEPT'
  end
  if only_if == 'R' then
    local status = redis.call('HGET', L.STATUSES, jobid)
    if not status or string.sub(status, 1, 4) ~= 'DIE:' or redis.call('HEXISTS', L.LEASES, jobid) == 1 then
      return 'KEPT'
    end
  end
  if data == 'null' then
    redis.call('HDEL', L.DATA, jobid)
  elseif data ~= '' then
    redis.call('HSET', L.DATA, jobid, data)
  end
  local new = redis.call('HEXISTS', L.SCHEDULES, jobid) == 0 -- (an unset job's record is no policy)
  redis.call('HSET', L.SCHEDULES, jobid, schedule)
  local record = L.job_of(jobid)
  local needs_before = record[L.NEEDS]
  if needs == '' then
    needs = needs_before -- none given: the job keeps what it needs
  elseif needs == L.CLEAR_NEEDS then
    needs = '' -- given as none: it needs nothing
  end
  record[L.NEEDS] = needs
  if misfire ~= '' then record[L.MISFIRE] = misfire elseif new then record[L.MISFIRE] = default_misfire end
  if retries ~= '' then record[L.RETRIES] = retries elseif new then record[L.RETRIES] = default_retries end
  if only_if == 'R' then
    L.note(record, 'retry', by)
  else
    L.note(record, 'set', by, p.status, needs, record[L.MISFIRE], record[L.RETRIES], schedule)
  end
  if redis.call('HEXISTS', L.LEASES, jobid) == 1 then
    L.drop_pending(jobid, record, p.due, expected, missed)
    record[L.PENDING] = placement
    L.save_job(jobid, record)
    return 'PENDING'
  end
  local current = redis.call('HGET', L.STATUSES, jobid)
  local same = p.kind == 'T' and p.due ~= '' and record[L.DUE] ~= '' and tonumber(p.due) == tonumber(record[L.DUE])
  if not same then L.cancel_waiting(jobid, record, expected, missed, current) end
  if p.kind == 'Q' and current and string.sub(current, 1, 4) == 'ENQ:'
      and (needs == needs_before or redis.call('HEXISTS', L.PARKING, jobid) == 0) then
    -- Already queued: it keeps its place in line (a job in line for a resource
    -- whose needs changed goes to the back of its queue instead), and the run
    -- it waits for is now for the new occurrence: the one it was queued for
    -- is coalesced into it.
    if p.due ~= '' and p.due ~= record[L.DUE] then
      L.add(record, L.COALESCED, 1)
      record[L.DUE], record[L.LAST_DUE] = p.due, p.due
    end
    if p.attempt ~= '' then record[L.ATTEMPT] = p.attempt end
    L.add(record, L.COALESCED, p.coalesced)
    L.add(record, L.SKIPPED, p.skipped)
    L.save_job(jobid, record)
    return 'PLACED'
  end
  L.unplace(jobid, queue)
  L.place(jobid, p, queue, channel, record, true, only_if == 'R')
  return 'PLACED'
end

local results = {}
for base = first_job, #ARGV, job_values do
  results[#results + 1] = set_job(ARGV[base], ARGV[base + 1], ARGV[base + 2], ARGV[base + 3], ARGV[base + 4])
end
return results
