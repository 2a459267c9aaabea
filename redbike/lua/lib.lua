-- lib.lua: helpers shared by every redbike script (prepended to each one).
--
-- Every script takes the same first twenty KEYS (the job state):
--   KEYS[1]  schedules   hash  jobid -> schedule text
--   KEYS[2]  statuses    hash  jobid -> "EVENT:TIMESTAMP"
--   KEYS[3]  timeline    zset  jobid scored by next run
--   KEYS[4]  leases      hash  jobid -> "token|queue|worker|since|timeout|due|attempt|needs"
--   KEYS[5]  deadlines   zset  jobid scored by lease deadline
--   KEYS[6]  errors      hash  jobid -> JSON of the last failure
--   KEYS[7]  control     string "HALT:<ts>:<nonce>"
--   KEYS[8]  dispatcher  string token of the leading dispatcher
--   KEYS[9]  capacities  hash  resource -> capacity (none: unlimited)
--   KEYS[10] usage       hash  resource -> amount held by running jobs, and
--                              set aside for woken jobs not yet claimed
--   KEYS[11] parked      zset  (lex) "resource|seq|queue|jobid": waits for resource
--   KEYS[12] ready       zset  (lex) "queue|seq|jobid": woken, claimed before the list
--   KEYS[13] parking     hash  jobid -> "P" .. parked member, or for a woken job
--                              "R" .. resource .. "=" .. amount set aside .. "|" .. ready member,
--                              or for a job set aside "A" .. capacity .. "|" .. aside member
--   KEYS[14] parkseq     counter giving parked jobs their order
--   KEYS[15] aside       zset  (lex) "resource|amount|seq|queue|jobid": needs more
--                              than the capacity (amount zero-padded: sorts by amount)
--   KEYS[16] jobs        hash  jobid -> job record "due|attempt|misfire|retries|
--                              fired|coalesced|skipped|cancelled|last_due|events|
--                              needs|pending" (needs "resource=amount,..."; pending:
--                              a placement set while the job ran, as the scripts
--                              take one), then its trail: each event "\n" ..
--                              "time|event|..."
--   KEYS[17] finished    list  "time|jobid" of the jobs that ended for good (END,
--                              SKP, unset), oldest first: retire.lua removes
--                              what they left keep-finished seconds later
--   KEYS[18] paused      set   names of the queues no claim takes jobs from
--   KEYS[19] totals      hash  counters since the start (stats.py): per queue
--                              "queue|due" (jobs enqueued), "queue|ms" (run
--                              time of the runs that ended by themselves),
--                              "queue|outcome|bucket" (runs that ended,
--                              counted by the slots' tallies and the reaper:
--                              done/failed/retried/expired, by duration bucket)
--   KEYS[20] data        hash  jobid -> the job's payload (JSON), if it has one
-- and the same first four ARGV: now (epoch seconds), the dispatcher's wake
-- channel, the prefix of the queue wake channels (+ queue name) and the
-- trail's length (events kept per job).
-- A script's own KEYS start at KEYS[K + 1], its own ARGV at ARGV[A + 1].
-- Times come from Python written short (records.encode_time: to the
-- millisecond, whole seconds as integers), so records and the trail copy
-- them as they are: converting them here cost the finish microseconds.
--
-- A placement (states.Placement.script_arg: one argument, its 7 values
-- joined by ',', records.encode_placement) says where a job goes next: kind
-- Q (its queue), T (the timeline at "at"), S (nowhere, just a status), X
-- (schedule becomes STOP), D (forget the job); then its status, the due time
-- of the occurrence it is for and the attempt ('' for both: keep the job
-- record's), and how many occurrences it coalesced and skipped (the misfire
-- policy's ledger counts). One argument, not seven: each argument costs the
-- worker its packing and Redis its reading and a Lua string in ARGV, more
-- than the one pattern that takes the text apart (callgrind, a plain run's
-- finish and claim: the slot's process about 8,600 instructions fewer,
-- Redis about 1,600), and most runs' placement is one constant text.
-- The constants and functions of the library are fields of one table: each
-- script call creates every function anew, and a function that captures
-- locals as upvalues (as local functions that call each other and read
-- shared locals do) costs several times more to create than one that
-- captures only this table.
local L = {}
L.SCHEDULES = KEYS[1]
L.STATUSES = KEYS[2]
L.TIMELINE = KEYS[3]
L.LEASES = KEYS[4]
L.DEADLINES = KEYS[5]
L.ERRORS = KEYS[6]
L.CONTROL = KEYS[7]
L.DISPATCHER = KEYS[8]
L.CAPACITIES = KEYS[9]
L.USAGE = KEYS[10]
L.PARKED = KEYS[11]
L.READY = KEYS[12]
L.PARKING = KEYS[13]
L.PARKSEQ = KEYS[14]
L.ASIDE = KEYS[15]
L.JOBS = KEYS[16]
L.FINISHED = KEYS[17]
L.PAUSED = KEYS[18]
L.TOTALS = KEYS[19]
L.DATA = KEYS[20]
L.K = 20 -- a script's own KEYS start at KEYS[K + 1]
L.A = 4 -- its own ARGV at ARGV[A + 1]
L.NOW = ARGV[1]
L.DISPATCH_CHANNEL = ARGV[2]
L.QUEUE_CHANNEL_PREFIX = ARGV[3]
L.MAX_PARKS = 64 -- jobs one claim may park before it lets other clients in
L.WAKE_BATCH = 1000 -- jobs one script may wake for a resource without a capacity
L.LOCAL_PREFIX = 'worker:' -- resources local to a worker pool (resources.LOCAL_PREFIX)
L.LAST = '\255' -- sorts after every byte a resource or queue name can hold
L.MAX_AMOUNT = 1000000000 -- most of a resource one job may need (resources.MAX_AMOUNT)
L.MAX_CAPACITY = 1000000000000 -- largest capacity (resources.MAX_CAPACITY)
L.CLEAR_NEEDS = 'none' -- set.lua's needs argument that drops the stored needs (records.CLEAR_NEEDS)
L.AMOUNT_DIGITS = 10 -- an amount in an aside member, zero-padded (parking.AMOUNT_DIGITS)
L.ASIDE_LOOK = 16 -- jobs set aside for a local resource one idle claim looks at
L.MAX_TIME = 1e18 -- bound of a time or a number of seconds: '%d' still writes it
L.ALTERNATIVES_SEP = ' ' -- between the needs of a job's alternative paths (records.ALTERNATIVES_SEP)
L.MAX_PATHS = 16 -- alternative paths one job may have (records.MAX_PATHS)
L.LINES_SEP = '\n' -- between the parked members of a job in several lines (parking.LINES_SEP)
L.ENDED = 'S,,END,,,0,0' -- the placement of a one-off that ran well, most runs' (states.ENDED)

-- Numbers written into records and increments: '%d', never Lua's '%.14g'
-- (2e+14 cannot be read back as an integer).
function L.int(n)
  return string.format('%d', n)
end

-- Argument checks. Redis does not roll back a script that fails half-way, so
-- every script checks all of its arguments before its first write. A finish
-- runs about twenty of them, and each call of a C function (type, a string
-- function) costs about as much as a short pattern: an argument is a string
-- or missing (nil, or false from a Redis reply), never of another type, so
-- `not text` stands in for type(text) ~= 'string', and each check is one
-- pattern where it can be.
function L.bad(what, value)
  local shown = string.gsub(string.sub(tostring(value), 1, 80), '%c', '?')
  return redis.error_reply('BADARG bad ' .. what .. ': "' .. shown .. '"')
end

-- A time or a number of seconds: a decimal (as Python's repr writes one),
-- finite, within MAX_TIME.
function L.time_of(text)
  if not text then return nil end
  if not (string.match(text, '^%-?%d+%.?%d*$') or string.match(text, '^%-?%d+%.?%d*[eE][%+%-]?%d+$')) then
    return nil
  end
  local n = tonumber(text)
  if n and n == n and n >= -L.MAX_TIME and n <= L.MAX_TIME then return n end
  return nil
end

-- Whether `text` is a number of seconds as a claim passes one (Python's
-- repr of a float under 1e16: digits, maybe a point and more digits) within
-- MAX_TIME: one pattern and no tonumber, which costs as much again (a claim
-- checks two per queue).
function L.is_seconds(text)
  local whole = text and string.match(text, '^(%d+)%.?%d*$')
  return whole ~= nil and #whole < 19
end

-- A whole number in [low, high], or nil.
function L.int_of(text, low, high)
  if not text or #text > 15 or not string.find(text, '^%d+$') then return nil end
  local n = text == '0' and 0 or tonumber(text) -- most counts a finish checks are 0: no strtod
  if n >= low and n <= high then return n end
  return nil
end

-- A job id or queue name: not empty, no '|' and no control character
-- (redbike.names).
function L.is_name(text)
  return text and string.find(text, '^%s*[^|%c%s][^|%c]*$') ~= nil
end

function L.is_local(name)
  return string.sub(name, 1, #L.LOCAL_PREFIX) == L.LOCAL_PREFIX
end

-- A resource name as redbike.resources.check_name allows it.
function L.is_resource(text)
  return text and string.find(text, '^[^%s|,=%c]+$') ~= nil
end

-- "a=1,b=2" with each amount in [low, high]; '' is none.
function L.is_amounts(text, low, high)
  if text == '' then return true end
  for part in string.gmatch(text .. ',', '([^,]*),') do
    local name, amount = string.match(part, '^([^=]*)=(%d+)$')
    if not L.is_resource(name) or not L.int_of(amount, low, high) then return false end
  end
  return true
end

-- A claim's worker-local room "a=free/capacity,..." ('' for none), each
-- free amount at most its capacity.
function L.is_local_room(text)
  if text == '' then return true end
  for part in string.gmatch(text .. ',', '([^,]*),') do
    local name, free, capacity = string.match(part, '^([^=]*)=(%d+)/(%d+)$')
    if not L.is_resource(name) or not L.is_local(name) then return false end
    free, capacity = L.int_of(free, 0, L.MAX_AMOUNT), L.int_of(capacity, 0, L.MAX_AMOUNT)
    if not free or not capacity or free > capacity then return false end
  end
  return true
end

-- A placement's text (see the header; also a job record's pending field)
-- -> placement, whose fields are nil if the text is not one.
function L.placement_of(text)
  local kind, at, status, due, attempt, coalesced, skipped =
    string.match(text, '^([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*),([^,]*)$')
  return {kind = kind, at = at, status = status, due = due, attempt = attempt, coalesced = coalesced,
    skipped = skipped}
end

-- What is wrong with placement `text` (nil if nothing), and the placement.
function L.placement_error(text)
  if text == L.ENDED then -- most runs': one comparison, no pattern and no checks
    return nil, {kind = 'S', at = '', status = 'END', due = '', attempt = '', coalesced = '0', skipped = '0'}
  end
  if not text then return L.bad('placement', text) end
  local p = L.placement_of(text)
  local kind, at, status, due, attempt = p.kind, p.at, p.status, p.due, p.attempt
  if kind ~= 'Q' and kind ~= 'T' and kind ~= 'S' and kind ~= 'X' and kind ~= 'D' then
    return L.bad('placement kind', kind or text)
  end
  if kind == 'T' and not L.time_of(at) then return L.bad('placement time', at) end
  if not string.find(status, '^%u*$') then return L.bad('status', status) end
  if due ~= '' and not L.time_of(due) then return L.bad('due time', due) end
  if attempt ~= '' and not L.int_of(attempt, 1, L.MAX_AMOUNT) then return L.bad('attempt', attempt) end
  if not L.int_of(p.coalesced, 0, L.MAX_TIME) then return L.bad('coalesced count', p.coalesced) end
  if not L.int_of(p.skipped, 0, L.MAX_TIME) then return L.bad('skipped count', p.skipped) end
  return nil, p
end

-- A misfire policy as records.check_misfire allows it: once, all, all:N,
-- skip:GRACE.
function L.is_misfire(text)
  return text == 'once' or text == 'all' or string.match(text, '^all:%d+$') ~= nil
    or string.match(text, '^skip:%d+$') ~= nil
end

-- A status: its event and the whole second of now (made once per call: a
-- finish and the claim after it write two).
function L.stamp(event)
  if not L.now_second then L.now_second = string.format('%d', L.NOW_N) end
  return event .. ':' .. L.now_second
end

function L.fence(token)
  if redis.call('GET', L.DISPATCHER) ~= token then
    return redis.error_reply('FENCED this dispatcher no longer leads')
  end
  return nil
end

-- What is wrong with the head of a leading dispatcher's batch (move_due,
-- reap), or nil and its queue count n: the dispatcher's fence token, n (as
-- many as the script's own KEYS), then n queue channels and `width` values
-- per item (`items` names them in the error).
function L.batch_error(width, items)
  local failed = L.fence(ARGV[L.A + 1])
  if failed then return failed end
  local n = L.int_of(ARGV[L.A + 2], 0, #KEYS - L.K)
  if not n or n ~= #KEYS - L.K then return L.bad('queue count', ARGV[L.A + 2]) end
  if (#ARGV - L.A - 2 - n) % width ~= 0 then return L.bad('count of ' .. items, #ARGV) end
  return nil, n
end

-- The records of records.py, decoded (their encoders are inline below).

function L.lease_token_matches(lease, token)
  return lease and string.sub(lease, 1, #token + 1) == token .. '|'
end

-- A lease record's needs (its last field).
function L.lease_needs(lease)
  return string.match(lease, '([^|]*)$')
end

-- A lease record -> token, queue, worker, since, timeout, due, attempt, needs
-- (the queue found by counting from both ends: the shortest that leaves six
-- fields after it, which for a queue without '|' is the first try, where a
-- greedy '.*' would try every position from the end first).
function L.lease_parts(lease)
  return string.match(lease, '^([^|]*)|(.-)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
end

-- The job record (records.JobRecord), as a list indexed by these fields
-- (EVENTS: how many its trail holds; NEEDS: what it needs, "resource=amount,...";
-- PENDING: a placement set while it ran, as set.lua took it), and the job's trail
-- in its field `trail`: the events, each "\n" .. "time|event|field|..."
-- (records.decode_trail_event), oldest first. All of it is one value of
-- JOBS: the claim reads it anyway (for the run's occurrence and needs), so
-- the finish that follows finds it in the cache, where keys of their own
-- per job (a trail list, a needs hash, a pending hash) cost the finish and
-- the claim a command each.
L.DUE = 1
L.ATTEMPT = 2
L.MISFIRE = 3
L.RETRIES = 4
L.FIRED = 5
L.COALESCED = 6
L.SKIPPED = 7
L.CANCELLED = 8
L.LAST_DUE = 9
L.EVENTS = 10
L.NEEDS = 11
L.PENDING = 12
L.RECORD = '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(%d+)|([^|]*)|([^|]*)$'
-- The same twelve fields, read two other ways: the claim's (the record's first
-- line, then its due time, attempt and needs: consider) and a plain run's
-- finish's (all before the events count, the count, the needs with the
-- empty pending field: append_event).
L.RECORD_CLAIMED = '^(([^|]*)|([^|]*)|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|([^|\n]*)|[^|\n]*)'
L.RECORD_COUNT = '^([^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|[^|]*|)(%d+)(|[^|]*|)$'
L.NEW_JOB = '|1|once|0|0|0|0|0||0||' -- the record of a job that has none (records.JobRecord())

-- The record of `jobid` (a new one, with the default policy, if it has none)
-- and its trail. The record's fields are matched apart from the trail: a
-- pattern that ran on over the trail would cost a finish a step per byte.
function L.job_of(jobid)
  return L.record_of(redis.call('HGET', L.JOBS, jobid))
end

-- The record and trail of a job record's text (a new record if `text` is
-- nil or false: the job has none).
function L.record_of(text)
  text = text or L.NEW_JOB
  local cut = string.find(text, '\n', 1, true)
  local record = {string.match(cut and string.sub(text, 1, cut - 1) or text, L.RECORD)}
  if #record ~= L.PENDING then
    record, cut = {string.match(L.NEW_JOB, L.RECORD)}, nil
  end
  record.trail = cut and string.sub(text, cut) or '' -- its events, each after a line break
  return record
end

function L.save_job(jobid, record)
  redis.call('HSET', L.JOBS, jobid, table.concat(record, '|') .. record.trail)
end

function L.add(record, field, count)
  if count ~= '0' and count ~= 0 then
    record[field] = L.int((tonumber(record[field]) or 0) + tonumber(count))
  end
end

-- Add an event to the trail of `record` (saved with it: save_job): its time,
-- its name, its fields (a line break in one, as a schedule may hold, becomes
-- a space). When the trail reaches half as many again as TRAIL_LENGTH, the
-- oldest events go, down to TRAIL_LENGTH. It needs no expiry: a job that
-- ends for good is listed in FINISHED, and retire.lua removes its record.
function L.note(record, ...)
  L.note_event(record, L.event(...))
end

-- note() with the event made (event(), run_event()).
function L.note_event(record, event)
  local trail, count = record.trail .. '\n' .. event, tonumber(record[L.EVENTS]) + 1
  if count >= L.TRAIL_LENGTH + (L.TRAIL_LENGTH + L.TRAIL_LENGTH % 2) / 2 then -- half as many again, rounded up
    local at = 0
    for _ = 0, count - L.TRAIL_LENGTH do at = string.find(trail, '\n', at + 1, true) end
    trail, count = string.sub(trail, at), L.TRAIL_LENGTH
  end
  record.trail, record[L.EVENTS] = trail, L.int(count)
end

-- A trail event: now and the fields, joined by '|' (a line break in one
-- becomes a space).
function L.event(...)
  local event = table.concat({L.NOW, ...}, '|')
  if string.find(event, '\n', 1, true) then event = (string.gsub(event, '\n', ' ')) end
  return event
end

-- A run's event (records.TRAIL_FIELDS['run']), as event() makes it, in one
-- concatenation: no table.
function L.run_event(due, attempt, token, worker, since, status, at, line)
  local event = L.NOW .. '|run|' .. due .. '|' .. attempt .. '|' .. token .. '|' .. worker .. '|' .. since .. '|'
    .. status .. '|' .. at .. '|' .. line
  if string.find(event, '\n', 1, true) then event = (string.gsub(event, '\n', ' ')) end
  return event
end

-- Add `event` to the trail of the job whose record's text is `text` and
-- save it, as note_event() and save_job() would, but without taking the record
-- apart: the one field read is the events count, the tenth of the twelve
-- of its first line. A plain run's finish, whose record changes in nothing
-- else, costs so about half as many strings and no record table. Returns
-- false, having changed nothing, where the record holds a pending placement
-- (its first line's last field is not empty), is not one (not twelve
-- fields: record_of() makes it a new one) or its trail is due to be cut:
-- note_event() handles those.
function L.append_event(jobid, text, event)
  local cut = string.find(text, '\n', 1, true)
  local head = cut and string.sub(text, 1, cut - 1) or text
  local before, count, after = string.match(head, L.RECORD_COUNT)
  if not count then return false end
  count = tonumber(count) + 1
  if count >= L.TRAIL_LENGTH + (L.TRAIL_LENGTH + L.TRAIL_LENGTH % 2) / 2 then return false end
  redis.call('HSET', L.JOBS, jobid,
    before .. L.int(count) .. after .. (cut and string.sub(text, cut) or '') .. '\n' .. event)
  return true
end

-- Add an event to the trail of a job whose record the caller has not read.
function L.trail(jobid, ...)
  local record = L.job_of(jobid)
  L.note(record, ...)
  L.save_job(jobid, record)
end

-- List a job that ended for good (records.encode_finished), for retire.lua.
function L.finished(jobid)
  redis.call('RPUSH', L.FINISHED, L.NOW .. '|' .. jobid)
end

-- "a=1,b=2" -> {{'a', 1}, {'b', 2}}
function L.parse_needs(text)
  local list = {}
  if not text or text == '' then return list end -- most jobs: no gmatch iterator made (a C call and a closure)
  for name, amount in string.gmatch(text, '([^,=]+)=(%d+)') do
    table.insert(list, {name, tonumber(amount)})
  end
  return list
end

-- Give back the global resources a run held (its lease's needs).
function L.release(needs_text)
  if needs_text == '' then return end
  for _, need in ipairs(L.parse_needs(needs_text)) do
    if not L.is_local(need[1]) then
      L.give_back(need[1], need[2])
      L.wake_if_room(need[1])
    end
  end
end

-- Take a job out of wherever it waits: timeline, queue, parked or ready.
function L.unplace(jobid, queue)
  redis.call('ZREM', L.TIMELINE, jobid)
  local status = redis.call('HGET', L.STATUSES, jobid)
  if status and string.sub(status, 1, 4) == 'ENQ:' then
    local parking = redis.call('HGET', L.PARKING, jobid)
    if parking then
      redis.call('HDEL', L.PARKING, jobid)
      local resource, amount, ready = L.woken_parts(parking)
      local _, aside = L.set_aside_parts(parking)
      if ready then -- woken: the amount set aside for it goes to the next in line
        redis.call('ZREM', L.READY, ready)
        L.give_back(resource, amount)
      elseif aside then -- set aside: it held no line
        redis.call('ZREM', L.ASIDE, aside)
      else -- parked (in one line, or one per path: LINES_SEP): the next in line may fit now that it is gone
        for member in string.gmatch(string.sub(parking, 2), '[^' .. L.LINES_SEP .. ']+') do
          redis.call('ZREM', L.PARKED, member)
          L.wake_if_room((L.parked_parts(member)))
        end
        resource = nil
      end
      if resource and resource ~= '' then L.wake_if_room(resource) end
    else
      redis.call('LREM', queue, 0, jobid)
    end
  end
end

function L.enqueue(jobid, queue, channel)
  -- Only a push onto an empty queue wakes idle workers: any worker that went
  -- idle saw the queue empty, so the push that filled it is the one to hear.
  if redis.call('LPUSH', queue, jobid) == 1 then
    redis.call('PUBLISH', channel, '1')
  end
  redis.call('HSET', L.STATUSES, jobid, L.stamp('ENQ'))
  redis.call('HINCRBY', L.TOTALS, string.sub(channel, #L.QUEUE_CHANNEL_PREFIX + 1) .. '|due', 1)
end

-- Count a run that ended in the totals of its queue as a slot's tally does
-- (records.encode_tally): the reaper's (and revoke.lua's) expired runs, which
-- no slot ends. Its duration bucket: upper bounds in seconds as stats.BUCKETS;
-- past the last, bucket #BUCKETS + 1.
function L.count_expired(queue_name, since)
  -- Bounded: a clock that jumped must not make the count fail half-way.
  local seconds = math.min(math.max(L.NOW_N - (tonumber(since) or L.NOW_N), 0), L.MAX_AMOUNT)
  local bounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800}
  local bucket = #bounds + 1
  for i = 1, #bounds do
    if seconds <= bounds[i] then bucket = i break end
  end
  redis.call('HINCRBY', L.TOTALS, queue_name .. '|expired|' .. bucket, 1)
end

-- A slot's tally: lines "field|count" (records.encode_tally), each field of
-- the totals (stats.py) and its increment; '' is none.
function L.is_tally(text)
  if text == '' then return true end -- most finishes carry no tally: no gmatch made
  if not text then return false end
  for line in string.gmatch(text, '[^\n]+') do
    if not string.match(line, '^[^|%c]+|[^%c]*|(%d+)$') or #string.match(line, '(%d+)$') > 15 then
      return false
    end
  end
  return true
end

-- Add a slot's tally to the totals (checked by is_tally); returns its lines' count.
function L.add_tally(text)
  local lines = 0
  if text == '' then return lines end
  for field, count in string.gmatch(text, '([^\n]+)|(%d+)') do
    redis.call('HINCRBY', L.TOTALS, field, count)
    lines = lines + 1
  end
  return lines
end

-- Forget a job's schedule and state (its needs and pending placement in
-- `record`, which the caller saves). Its record (the ledger) and trail stay
-- until keep-finished has passed (retire.lua), so that explain can tell.
function L.forget(jobid, record)
  for _, key in ipairs({L.SCHEDULES, L.STATUSES, L.ERRORS, L.DATA}) do
    redis.call('HDEL', key, jobid)
  end
  record[L.NEEDS], record[L.PENDING] = '', ''
  L.finished(jobid)
end

-- A job unset or set again leaves occurrences that will not run: the one
-- it waits for in the timeline, and those of its schedule that fell due
-- after the occurrence it waits for or is queued for (`missed`: the caller
-- counted them, after occurrence `expected`; counted only if that is still
-- the job's). The ledger counts them cancelled, in `record`. A running job's
-- are for its run's end to count.
function L.cancel_waiting(jobid, record, expected, missed, status)
  local waiting = redis.call('ZSCORE', L.TIMELINE, jobid) and 1 or 0
  local queued = status and string.sub(status, 1, 4) == 'ENQ:'
  if waiting == 0 and not queued then return end
  local count = waiting
  if expected ~= '' and record[L.DUE] ~= '' and tonumber(record[L.DUE]) == tonumber(expected) then
    count = count + tonumber(missed)
  end
  if count > 0 then
    L.add(record, L.CANCELLED, count)
    L.note(record, 'cancelled', record[L.DUE], L.int(count))
  end
end

-- A running job's placement set while it ran (pending), dropped by another
-- set (placing occurrence `due`) or an unset: what it decided stands (its
-- coalesced and skipped counts), and its own occurrence, and those of its
-- schedule due after it until now (`missed`, counted by the caller for
-- occurrence `expected`), are cancelled: none of them will run.
function L.drop_pending(jobid, record, due, expected, missed)
  local before = record[L.PENDING]
  if before == '' then return end
  record[L.PENDING] = ''
  local dropped = L.placement_of(before)
  L.add(record, L.COALESCED, dropped.coalesced)
  L.add(record, L.SKIPPED, dropped.skipped)
  if (dropped.kind == 'Q' or dropped.kind == 'T') and dropped.due ~= '' and dropped.due ~= due then
    local count = 1
    if tonumber(expected) == tonumber(dropped.due) then count = count + tonumber(missed) end
    L.add(record, L.CANCELLED, count)
    L.note(record, 'cancelled', dropped.due, L.int(count))
  end
end

-- Place a job (placement `p`; see the header) and write its record: the
-- occurrence and attempt it is placed for, the ledger counts. A job placed
-- in its queue fires its occurrence (the ledger's fired count and last due).
-- `record`: the job's record if the caller has read (and changed) it;
-- `noted`: the caller wrote the trail event (set.lua), so no 'enqueued';
-- `again`: it runs an occurrence that already fired again (the retry command).
function L.place(jobid, p, queue, channel, record, noted, again)
  local kind = p.kind
  if kind == 'D' then
    record = record or L.job_of(jobid)
    L.forget(jobid, record)
    L.save_job(jobid, record)
    return
  end
  local counted = p.coalesced ~= '0' or p.skipped ~= '0'
  if record or counted or kind == 'Q' or kind == 'T' then
    record = record or L.job_of(jobid)
    if p.due ~= '' then record[L.DUE] = p.due end
    if p.attempt ~= '' then record[L.ATTEMPT] = p.attempt end
    L.add(record, L.COALESCED, p.coalesced)
    L.add(record, L.SKIPPED, p.skipped)
    if kind == 'Q' then
      if record[L.DUE] == '' then record[L.DUE] = L.NOW end
      -- An occurrence fires once: a retry of it (a later attempt, or the
      -- retry command) is not another.
      if record[L.ATTEMPT] == '1' and not again then L.add(record, L.FIRED, 1) end
      record[L.LAST_DUE] = record[L.DUE]
    end
    if counted then
      L.note(record, 'misfire', record[L.MISFIRE], p.coalesced, p.skipped, record[L.DUE])
    end
    if kind == 'Q' and not noted then L.note(record, 'enqueued', record[L.DUE], record[L.ATTEMPT]) end
    L.save_job(jobid, record)
  end
  if kind == 'Q' then
    L.enqueue(jobid, queue, channel)
  elseif kind == 'T' then
    local head = redis.call('ZRANGE', L.TIMELINE, 0, 0, 'WITHSCORES')
    redis.call('ZADD', L.TIMELINE, p.at, jobid)
    redis.call('HSET', L.STATUSES, jobid, L.stamp(p.status))
    -- Wake the dispatcher only when it would otherwise sleep past this job.
    if head[2] == nil or tonumber(p.at) < tonumber(head[2]) then
      redis.call('PUBLISH', L.DISPATCH_CHANNEL, p.at)
    end
  elseif kind == 'S' or kind == 'X' then
    if kind == 'X' then redis.call('HSET', L.SCHEDULES, jobid, 'STOP') end
    redis.call('HSET', L.STATUSES, jobid, L.stamp(p.status))
    -- A one-off that ran or was skipped is kept keep-finished seconds.
    if p.status == 'END' or p.status == 'SKP' then L.finished(jobid) end
  end
end

-- End the run that holds lease `token`: release the lease and what it held,
-- and place the job. A `set` made while the job ran (the pending placement)
-- wins over the run's own; a job unset while it ran is just released. A stale
-- token changes nothing. A run the reaper (or revoke.lua) ends, `expired`,
-- counts in its queue's totals here; a slot counts the runs it ends itself
-- and sends them as its tally.
function L.finish(jobid, token, p, err, queue, channel, fires, expired)
  local lease = redis.call('HGET', L.LEASES, jobid)
  -- Taken apart first: its token is then its first field, compared whole.
  local lease_token, queue_name, worker, since, _, due, attempt, needs
  if lease then lease_token, queue_name, worker, since, _, due, attempt, needs = L.lease_parts(lease) end
  if lease_token ~= token then
    return 'STALE'
  end
  redis.call('HDEL', L.LEASES, jobid)
  redis.call('ZREM', L.DEADLINES, jobid)
  if needs ~= '' then L.release(needs) end
  if expired then L.count_expired(queue_name, since) end -- a slot counts its own runs (records.encode_tally)
  local line = ''
  if err ~= '' then
    local ok, decoded = pcall(cjson.decode, err)
    if ok and type(decoded) == 'table' and type(decoded.error) == 'string' then line = decoded.error end
  end
  local gone = redis.call('HEXISTS', L.SCHEDULES, jobid) == 0
  local text = redis.call('HGET', L.JOBS, jobid)
  -- A run that ends its job (a one-off done or dead, a schedule STOP:
  -- placement S or X with no due time, attempt or misfire counts) changes
  -- its record only in its trail: append_event writes that without taking
  -- the record apart.
  if text and not gone and (p.kind == 'S' or p.kind == 'X') and p.due == '' and p.attempt == ''
      and p.coalesced == '0' and p.skipped == '0'
      and L.append_event(jobid, text, L.run_event(due, attempt, token, worker, since, p.status, p.at, line)) then
    if err ~= '' then redis.call('HSET', L.ERRORS, jobid, err) end
    L.place(jobid, p, queue, channel)
    return 'DONE'
  end
  local record = L.record_of(text)
  local pending = record[L.PENDING] ~= '' and record[L.PENDING]
  record[L.PENDING] = ''
  if gone or pending then
    -- The run's own placement gives way (the job was unset or set again while
    -- it ran), but what it says of the occurrences that fell due while the
    -- job waited or ran holds: the ledger counts them, and those it would
    -- have fired (`fires`) never run: cancelled.
    L.add(record, L.COALESCED, p.coalesced)
    L.add(record, L.SKIPPED, p.skipped)
    if fires ~= '0' then
      L.add(record, L.CANCELLED, fires)
      L.note(record, 'cancelled', p.due, fires)
    end
  end
  if gone then
    L.note_event(record, L.run_event(due, attempt, token, worker, since, 'GONE', '', line))
    L.save_job(jobid, record)
    return 'GONE'
  end
  if err ~= '' then
    redis.call('HSET', L.ERRORS, jobid, err)
  end
  if pending then
    p = L.placement_of(pending)
  end
  L.note_event(record, L.run_event(due, attempt, token, worker, since, p.status, p.at, line))
  L.place(jobid, p, queue, channel, record)
  return 'DONE'
end

-- The next job of a queue: one woken from a resource first (it became due
-- before anything still in the list), else the list's oldest. A woken job's
-- amount set aside is given back here; the claim takes it again with the
-- job's other needs, or passes it on.
-- Returns jobid, its park sequence (if it was parked), its ready member, and
-- the resource and amount that were set aside for it.
function L.next_candidate(queue, queue_name)
  local ready = L.ready_or_paused ~= 'none' and redis.call('ZRANGEBYLEX', L.READY, '[' .. queue_name .. '|',
    '(' .. queue_name .. '|' .. L.LAST, 'LIMIT', 0, 1)[1]
  if ready then
    redis.call('ZREM', L.READY, ready)
    local _, seq, jobid = L.ready_parts(ready)
    local resource, amount = L.woken_parts(redis.call('HGET', L.PARKING, jobid))
    redis.call('HDEL', L.PARKING, jobid)
    if resource then L.give_back(resource, amount) end
    return jobid, seq, ready, resource, amount
  end
  return redis.call('RPOP', queue), nil, nil, nil, nil
end

-- The first global resource in `needs` without room for it, or nil. A
-- resource with jobs in line for it that came before this one (any, for a
-- job with no park sequence `seq`) has no room for it either: no job
-- overtakes one that waits for the same resource. For a job that needs more
-- than a capacity (not 0: that is a pause) and so would hold the line
-- forever, also the amount it needs and the capacity.
function L.blocker(needs, seq)
  for _, need in ipairs(needs) do
    if not L.is_local(need[1]) then
      local capacity = redis.call('HGET', L.CAPACITIES, need[1])
      if capacity then
        capacity = tonumber(capacity)
        if capacity > 0 and need[2] > capacity then return need[1], need[2], capacity end
        local used = tonumber(redis.call('HGET', L.USAGE, need[1]) or '0')
        if used + need[2] > capacity then return need[1] end
        local first, first_seq = L.first_in_line(need[1])
        if first and (not seq or first_seq < seq) then return need[1] end
      end
    end
  end
  return nil
end

-- A claim's worker-local room (see is_local_room) -> name -> {free,
-- capacity}, or nil when the pool declared none (then they are unlimited).
function L.parse_local_room(text)
  if text == '' then return nil end
  local room = {}
  for name, free, capacity in string.gmatch(text, '([^,=]+)=(%d+)/(%d+)') do
    room[name] = {tonumber(free), tonumber(capacity)}
  end
  return room
end

-- The first worker-local need in `needs` larger than the pool's capacity
-- (its name, the amount and the capacity), or nil.
function L.too_big_here(needs, room)
  if not room then return nil end
  for _, need in ipairs(needs) do
    local have = room[need[1]]
    if have and need[2] > have[2] then return need[1], need[2], have[2] end
  end
  return nil
end

-- Whether the pool has the worker-local amounts `needs` asks for free now.
function L.fits_locally(needs, room)
  if not room then return true end
  for _, need in ipairs(needs) do
    local have = room[need[1]]
    if have and need[2] > have[1] then return false end
  end
  return true
end

-- What a claim does with job `jobid` of queue i (0-based; see claim() for
-- the arguments, next_candidate() for seq, ready, held, amount): claims it
-- and returns the claim's reply; or returns 'parked' (in line for a global
-- resource, or set aside: it needs more than a capacity), 'full' (the pool
-- lacks local room now: it stays first in its queue) or 'dropped'.
function L.consider(token, worker, room, i, queue, base, jobid, seq, ready, held, amount)
  local queue_name = ARGV[base]
  -- An id without a schedule was unset by a writer that did not remove it
  -- from its queue (e.g. another language's client): drop it.
  local schedule = redis.call('HGET', L.SCHEDULES, jobid)
  if not schedule then
    if held then L.wake_if_room(held) end
    return 'dropped'
  end
  -- The run's occurrence, attempt and needs, read straight off the record
  -- (the worker decodes the rest only if it needs it; the trail stays here).
  local record, due, attempt, needs_text = string.match(redis.call('HGET', L.JOBS, jobid) or L.NEW_JOB,
    L.RECORD_CLAIMED)
  if not record then record, due, attempt, needs_text = L.NEW_JOB, '', '1', '' end
  -- A job with alternative paths (replicas: their needs joined by
  -- ALTERNATIVES_SEP) takes the first with room, or waits in line for each
  -- (take_path); what it takes is what its lease holds. A plain job pays
  -- this one find.
  local paths = string.find(needs_text, L.ALTERNATIVES_SEP, 1, true)
  if paths then
    needs_text = L.take_path(jobid, needs_text, room, queue_name, seq)
    if not needs_text then
      if held then L.wake_if_room(held) end
      return 'parked'
    end
  end
  -- A job that needs nothing (most) skips all of this: no table of needs,
  -- no look at a capacity.
  if needs_text ~= '' then
    local needs = L.parse_needs(needs_text)
    local lacking, need, capacity
    if not paths then
      lacking, need, capacity = L.too_big_here(needs, room)
      if not lacking then lacking, need, capacity = L.blocker(needs, seq) end
    end
    if lacking then
      if capacity then
        L.set_aside(jobid, lacking, need, capacity, queue_name, seq)
        L.trail(jobid, 'aside', lacking, need, capacity)
      else
        L.park(jobid, lacking, queue_name, seq)
        L.trail_parked(jobid, lacking, room)
      end
      -- The place it was woken for goes to the next in line.
      if held then L.wake_if_room(held) end
      return 'parked'
    end
    if not L.fits_locally(needs, room) then
      L.put_back(queue, jobid, ready, held, amount)
      return 'full'
    end
    for _, one in ipairs(needs) do
      if not L.is_local(one[1]) then redis.call('HINCRBY', L.USAGE, one[1], L.int(one[2])) end
    end
  end
  if due == '' then due = L.NOW end -- a job a foreign client pushed is for now
  redis.call('HSET', L.LEASES, jobid, token .. '|' .. queue_name .. '|' .. worker .. '|' .. L.NOW .. '|'
    .. ARGV[base + 1] .. '|' .. due .. '|' .. attempt .. '|' .. needs_text)
  redis.call('ZADD', L.DEADLINES, L.NOW_N + tonumber(ARGV[base + 2]), jobid)
  redis.call('HSET', L.STATUSES, jobid, L.stamp('WRK'))
  return {'JOB', jobid, i, schedule, record, needs_text, redis.call('HGET', L.DATA, jobid) or ''}
end

-- Put a candidate of next_candidate() back where it was: first in its
-- queue, or (a woken job) back in ready with its amount set aside again.
function L.put_back(queue, jobid, ready, held, amount)
  if ready then
    redis.call('ZADD', L.READY, 0, ready)
    L.ready_or_paused = 'some'
    if held and amount > 0 then redis.call('HINCRBY', L.USAGE, held, L.int(amount)) end
    redis.call('HSET', L.PARKING, jobid, 'R' .. (held or '') .. '=' .. L.int(amount or 0) .. '|' .. ready)
  else
    redis.call('RPUSH', queue, jobid)
  end
end

-- Whether queue `name` is paused (KEYS[18]). The set is read once per script
-- call, and only when a claim has a job in hand and some queue is paused (or
-- a job woken): an idle worker's claims, which find none, read nothing more.
function L.is_paused(name)
  if not L.paused_names then
    L.paused_names = {}
    if L.ready_or_paused ~= 'none' then
      for _, paused in ipairs(redis.call('SMEMBERS', L.PAUSED)) do L.paused_names[paused] = true end
    end
  end
  return L.paused_names[name] == true
end

-- Claim the first job found in the queues KEYS[first .. first+count-1], tried
-- in that order. Per queue i (0-based), ARGV[spec + 3*i .. spec + 3*i + 2] hold
-- its name, its timeout and the seconds until the lease's first deadline.
-- `local_room` is the pool's worker-local room ("cpu=3/4,...": free now and
-- declared) or ''. A job whose global needs have no room is parked on the
-- resource that lacks it; one that needs more than a capacity (global, or
-- this pool's local one) is set aside; one the pool lacks local room for
-- now stays first in its queue. A paused queue (KEYS[18]) is passed over.
-- Returns {'JOB', jobid, i, schedule, job record, needs, payload ('' if none)},
-- {'NONE'}, {'MORE'} (parked many: call again), or {'HALT', control} once the
-- control key holds a value the worker has not seen.
function L.claim(token, worker, control_seen, local_room, first, count, spec)
  -- One command for most claims: none of the control key, READY and PAUSED
  -- exists. Only when one does is the control value read; what the count
  -- leaves over says whether a woken job waits in READY or a queue is paused
  -- (ready_or_paused: 'none' or 'some'; a job woken or put back into READY
  -- later in this call, by wake or put_back, makes it 'some'). Most claims
  -- find neither, and so skip a ZRANGEBYLEX per queue they try and the read
  -- of the paused set.
  local present = redis.call('EXISTS', L.CONTROL, L.READY, L.PAUSED)
  local control = present > 0 and redis.call('GET', L.CONTROL)
  if control and control ~= control_seen then
    return {'HALT', control}
  end
  L.ready_or_paused = present > (control and 1 or 0) and 'some' or 'none'
  local some = L.ready_or_paused == 'some' -- else no queue is paused: is_paused is not asked
  local room = local_room ~= '' and L.parse_local_room(local_room) or nil -- most pools: no local resource
  local parks = 0
  for i = 0, count - 1 do
    local queue, base = KEYS[first + i], spec + 3 * i
    while true do
      local jobid, seq, ready, held, amount = L.next_candidate(queue, ARGV[base])
      if not jobid then break end
      if some and L.is_paused(ARGV[base]) then -- passed over: the job stays first in line
        L.put_back(queue, jobid, ready, held, amount)
        break
      end
      local claimed = L.consider(token, worker, room, i, queue, base, jobid, seq, ready, held, amount)
      if type(claimed) == 'table' then return claimed end
      if claimed == 'full' then break end
      if claimed == 'parked' then
        parks = parks + 1
        if parks >= L.MAX_PARKS then return {'MORE'} end
      end
    end
  end
  return L.claim_aside(token, worker, local_room, room, first, count, spec)
end

-- What is wrong with the arguments of claim() (see there), or nil.
function L.claim_error(token, worker, local_room, first, count, spec)
  if not L.is_name(token) then return L.bad('token', token) end
  if not L.is_name(worker) then return L.bad('worker id', worker) end
  if local_room ~= '' and not L.is_local_room(local_room) then return L.bad('worker-local room', local_room) end
  if #KEYS ~= first + count - 1 or #ARGV ~= spec + 3 * count - 1 then
    return L.bad('count of queues', count)
  end
  for i = 0, count - 1 do
    local base = spec + 3 * i
    if not L.is_name(ARGV[base]) then return L.bad('queue name', ARGV[base]) end
    if not L.is_seconds(ARGV[base + 1]) then return L.bad('timeout', ARGV[base + 1]) end
    if not L.is_seconds(ARGV[base + 2]) then return L.bad('lease seconds', ARGV[base + 2]) end
  end
  return nil
end

-- What is wrong with the arguments of finish() (see there), or nil; and
-- its placement, read from `placement` (see placement_error).
function L.finish_error(jobid, token, placement, err, fires)
  if not jobid or jobid == '' then return L.bad('job id', jobid) end
  if not L.is_name(token) then return L.bad('token', token) end
  if not err then return L.bad('error record', err) end
  if not L.int_of(fires, 0, L.MAX_TIME) then return L.bad('fired count', fires) end
  return L.placement_error(placement)
end

-- Now as a number, and the trail's length: checked and parsed in one step
-- (tonumber is a C call: each costs a finish as much as a short pattern).
L.NOW_N = L.time_of(L.NOW)
if not L.NOW_N then return L.bad('now', L.NOW) end
L.TRAIL_LENGTH = L.int_of(ARGV[4], 1, L.MAX_AMOUNT)
if not L.TRAIL_LENGTH then return L.bad('trail length', ARGV[4]) end
