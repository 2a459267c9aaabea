-- lib.lua: helpers shared by every redbike script (prepended to each one).
--
-- Every job-state script takes the same first nine KEYS:
--   KEYS[1] schedules   hash  jobid -> schedule text
--   KEYS[2] statuses    hash  jobid -> "EVENT:TIMESTAMP"
--   KEYS[3] timeline    zset  jobid scored by next run
--   KEYS[4] leases      hash  jobid -> "token|queue|worker|since|timeout"
--   KEYS[5] deadlines   zset  jobid scored by lease deadline
--   KEYS[6] pending     hash  jobid -> "kind|at|status" set while the job ran
--   KEYS[7] errors      hash  jobid -> JSON of the last failure
--   KEYS[8] control     string "HALT:<ts>:<nonce>"
--   KEYS[9] dispatcher  string token of the leading dispatcher
-- and ARGV[1] = now (epoch seconds), ARGV[2] = the dispatcher's wake channel.
--
-- A placement says where a job goes next: kind Q (its queue), T (the
-- timeline at "at"), S (nowhere, just a status), X (schedule becomes STOP),
-- D (forget the job).
local SCHEDULES, STATUSES, TIMELINE, LEASES, DEADLINES, PENDING, ERRORS, CONTROL, DISPATCHER =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local NOW = ARGV[1]
local NOW_N = tonumber(ARGV[1])
local DISPATCH_CHANNEL = ARGV[2]

local function stamp(event)
  return event .. ':' .. string.format('%d', NOW_N)
end

local function fence(token)
  if redis.call('GET', DISPATCHER) ~= token then
    return redis.error_reply('FENCED this dispatcher no longer leads')
  end
  return nil
end

-- Take a job out of the timeline or its queue (it is in at most one).
local function unplace(jobid, queue)
  redis.call('ZREM', TIMELINE, jobid)
  local status = redis.call('HGET', STATUSES, jobid)
  if status and string.sub(status, 1, 4) == 'ENQ:' then
    redis.call('LREM', queue, 0, jobid)
  end
end

local function enqueue(jobid, queue, channel)
  -- Only a push onto an empty queue wakes idle workers: any worker that went
  -- idle saw the queue empty, so the push that filled it is the one to hear.
  if redis.call('LPUSH', queue, jobid) == 1 then
    redis.call('PUBLISH', channel, '1')
  end
  redis.call('HSET', STATUSES, jobid, stamp('ENQ'))
end

local function place(jobid, kind, at, status, queue, channel)
  if kind == 'Q' then
    enqueue(jobid, queue, channel)
  elseif kind == 'T' then
    local head = redis.call('ZRANGE', TIMELINE, 0, 0, 'WITHSCORES')
    redis.call('ZADD', TIMELINE, at, jobid)
    redis.call('HSET', STATUSES, jobid, stamp(status))
    -- Wake the dispatcher only when it would otherwise sleep past this job.
    if head[2] == nil or tonumber(at) < tonumber(head[2]) then
      redis.call('PUBLISH', DISPATCH_CHANNEL, at)
    end
  elseif kind == 'S' then
    redis.call('HSET', STATUSES, jobid, stamp(status))
  elseif kind == 'X' then
    redis.call('HSET', SCHEDULES, jobid, 'STOP')
    redis.call('HSET', STATUSES, jobid, stamp(status))
  elseif kind == 'D' then
    redis.call('HDEL', SCHEDULES, jobid)
    redis.call('HDEL', STATUSES, jobid)
    redis.call('HDEL', ERRORS, jobid)
  else
    return redis.error_reply('unknown placement kind ' .. tostring(kind))
  end
  return nil
end

-- End the run that holds lease `token`: release the lease and place the job.
-- A `set` made while the job ran (the pending placement) wins over the run's
-- own; a job unset while it ran is just released. A stale token changes nothing.
local function finish(jobid, token, kind, at, status, err, queue, channel)
  local lease = redis.call('HGET', LEASES, jobid)
  if not lease or string.sub(lease, 1, #token + 1) ~= token .. '|' then
    return 'STALE'
  end
  redis.call('HDEL', LEASES, jobid)
  redis.call('ZREM', DEADLINES, jobid)
  if redis.call('HEXISTS', SCHEDULES, jobid) == 0 then
    redis.call('HDEL', PENDING, jobid)
    return 'GONE'
  end
  if err ~= '' then
    redis.call('HSET', ERRORS, jobid, err)
  end
  local pending = redis.call('HGET', PENDING, jobid)
  if pending then
    redis.call('HDEL', PENDING, jobid)
    kind, at, status = string.match(pending, '^([^|]*)|([^|]*)|(.*)$')
  end
  local failed = place(jobid, kind, at, status, queue, channel)
  if failed then return failed end
  return 'DONE'
end

-- Claim the first job found in the queues KEYS[first .. first+count-1], tried
-- in that order. Per queue i (0-based), ARGV[spec + 3*i .. spec + 3*i + 2] hold
-- its name, its timeout and the seconds until the lease's first deadline.
-- Returns {'JOB', jobid, i, schedule, status-before-claim}, {'NONE'}, or
-- {'HALT', control} once the control key holds a value the worker has not seen.
local function claim(token, worker, control_seen, first, count, spec)
  local control = redis.call('GET', CONTROL)
  if control and control ~= control_seen then
    return {'HALT', control}
  end
  for i = 0, count - 1 do
    local queue = KEYS[first + i]
    local jobid = redis.call('RPOP', queue)
    while jobid do
      local schedule = redis.call('HGET', SCHEDULES, jobid)
      -- An id without a schedule was unset by a writer that did not remove it
      -- from its queue (e.g. another language's client): drop it.
      if schedule then
        local base = spec + 3 * i
        local status = redis.call('HGET', STATUSES, jobid) or ''
        redis.call('HSET', LEASES, jobid,
          token .. '|' .. ARGV[base] .. '|' .. worker .. '|' .. NOW .. '|' .. ARGV[base + 1])
        redis.call('ZADD', DEADLINES, NOW_N + tonumber(ARGV[base + 2]), jobid)
        redis.call('HSET', STATUSES, jobid, stamp('WRK'))
        return {'JOB', jobid, i, schedule, status}
      end
      jobid = redis.call('RPOP', queue)
    end
  end
  return {'NONE'}
end
