-- waiting.lua: the library's functions for jobs that wait for a resource:
-- parked in line for it, woken (ready, their amount set aside) or set aside
-- (they need more than its capacity). Members and parking values are
-- described in lib.lua's header (KEYS[13] to KEYS[17]).
--
-- These are functions of lib.lua's table L like the others, and a client may
-- load this file as it is, after lib.lua. redbike defines them only when a
-- script first calls one of them (scripts.py): a job that needs no resource,
-- or finds room, never does, and each function a script defines costs every
-- call of the script an allocation.

-- A parked member -> resource, seq, queue, jobid.
function L.parked_parts(member)
  return string.match(member, '^([^|]*)|([^|]*)|([^|]*)|(.*)$')
end

-- A ready member -> queue, seq, jobid.
function L.ready_parts(ready)
  return string.match(ready, '^([^|]*)|([^|]*)|(.*)$')
end

-- A woken job's parking value -> resource, amount set aside, ready member.
function L.woken_parts(parking)
  local resource, amount, ready = string.match(parking or '', '^R([^=|]*)=(%d+)|(.*)$')
  return resource, tonumber(amount), ready
end

-- An aside member -> resource, amount, seq, queue, jobid.
function L.aside_parts(member)
  local resource, amount, seq, queue_name, jobid = string.match(member, '^([^|]*)|(%d+)|([^|]*)|([^|]*)|(.*)$')
  return resource, tonumber(amount), seq, queue_name, jobid
end

-- An aside job's parking value -> the capacity it exceeded, its aside member.
function L.set_aside_parts(parking)
  local capacity, member = string.match(parking or '', '^A(%d+)|(.*)$')
  return tonumber(capacity), member
end

-- How much of `resource` a job needs (0 if none; on any of its paths: a
-- resource's amount is the same on each), and whether it has alternative
-- paths (then it may wait in several lines: leave_lines).
function L.need_of(jobid, resource)
  local text = L.job_of(jobid)[L.NEEDS]
  local paths = string.find(text, L.ALTERNATIVES_SEP, 1, true) ~= nil
  if paths then text = string.gsub(text, L.ALTERNATIVES_SEP, ',') end
  for _, need in ipairs(L.parse_needs(text)) do
    if need[1] == resource then return need[2], paths end
  end
  return 0, paths
end

function L.give_back(resource, amount)
  if amount > 0 and redis.call('HINCRBY', L.USAGE, resource, L.int(-amount)) <= 0 then
    redis.call('HDEL', L.USAGE, resource)
  end
end

-- The first job in line for `resource` (its parked member and seq), or nil.
function L.first_in_line(resource)
  local member = redis.call('ZRANGEBYLEX', L.PARKED, '[' .. resource .. '|', '(' .. resource .. '|' .. L.LAST,
    'LIMIT', 0, 1)[1]
  if member then
    local _, seq = L.parked_parts(member)
    return member, seq
  end
  return nil, nil
end

function L.new_seq(seq)
  return seq or string.format('%016d', redis.call('INCR', L.PARKSEQ))
end

-- Put a job in line for `resource`, at its place `seq` (kept from an earlier
-- wait, so that it keeps its age) or at the back.
function L.park(jobid, resource, queue_name, seq)
  local member = resource .. '|' .. L.new_seq(seq) .. '|' .. queue_name .. '|' .. jobid
  redis.call('ZADD', L.PARKED, 0, member)
  redis.call('HSET', L.PARKING, jobid, 'P' .. member)
end

-- Set a job aside: it needs `amount` of `resource`, more than its `capacity`
-- (seen by the script or, for a local resource, declared by the pool that
-- tried it), so it would hold its line forever. It keeps its `seq`.
function L.set_aside(jobid, resource, amount, capacity, queue_name, seq)
  local padded = string.format('%0' .. L.AMOUNT_DIGITS .. 'd', amount)
  local member = table.concat({resource, padded, L.new_seq(seq), queue_name, jobid}, '|')
  redis.call('ZADD', L.ASIDE, 0, member)
  redis.call('HSET', L.PARKING, jobid, 'A' .. L.int(capacity) .. '|' .. member)
end

-- ZRANGEBYLEX bounds of the jobs set aside for `resource` that need at most
-- `most` of it (nil: any amount).
function L.aside_range(resource, most)
  if not most then return '[' .. resource .. '|', '(' .. resource .. '|' .. L.LAST end
  local above = string.format('%0' .. L.AMOUNT_DIGITS .. 'd', math.min(most, L.MAX_AMOUNT) + 1)
  return '[' .. resource .. '|', '(' .. resource .. '|' .. above
end

-- Wake the jobs parked on `resource`, oldest first, while the next one's
-- amount fits in `room` (nil: unlimited, at most WAKE_BATCH): move each to
-- the ready set, where the next claim of its queue finds it, set its amount
-- aside in usage (so that no later job takes its place), and wake its queue.
-- Stops at the first job that does not fit: jobs start in line order. A job
-- that needs more than `capacity` (a lowered one; 0 pauses, it is not too
-- small) is set aside instead of holding the line.
function L.wake(resource, room, capacity)
  local sized = capacity and capacity > 0
  local woken, moved = 0, true
  while moved do
    moved = false
    local want = L.WAKE_BATCH - woken
    if room then want = math.min(want, room) end
    if want <= 0 and not sized then break end
    -- With a capacity, look one past the jobs there is room for: the head
    -- left after them (or the head, with no room) may never fit, and must
    -- not hold the line.
    local limit = math.max(want, 1)
    if sized then limit = math.max(want, 0) + 1 end
    local heads = redis.call('ZRANGEBYLEX', L.PARKED, '[' .. resource .. '|', '(' .. resource .. '|' .. L.LAST,
      'LIMIT', 0, limit)
    for _, member in ipairs(heads) do
      local _, seq, queue_name, jobid = L.parked_parts(member)
      local amount, paths = L.need_of(jobid, resource)
      if sized and amount > capacity then
        redis.call('ZREM', L.PARKED, member)
        -- A job with other paths waits on in their lines; one without is set aside.
        if not (paths and L.leave_lines(jobid, member, true)) then
          L.set_aside(jobid, resource, amount, capacity, queue_name, seq)
        end
        moved = true
      elseif want <= 0 or (room and amount > room) then
        moved = false
        break
      else
        if room then room = room - amount end
        want = want - 1
        local ready = queue_name .. '|' .. seq .. '|' .. jobid
        redis.call('ZREM', L.PARKED, member)
        if paths then L.leave_lines(jobid, member, false) end -- woken by one path: out of the others' lines
        redis.call('ZADD', L.READY, 0, ready)
        L.ready_or_paused = 'some'
        if amount > 0 then redis.call('HINCRBY', L.USAGE, resource, L.int(amount)) end
        redis.call('HSET', L.PARKING, jobid, 'R' .. resource .. '=' .. L.int(amount) .. '|' .. ready)
        redis.call('PUBLISH', L.QUEUE_CHANNEL_PREFIX .. queue_name, '1')
        L.trail(jobid, 'woken', resource)
        woken = woken + 1
      end
    end
  end
  return woken
end

-- Wake as many jobs parked on `resource` as it has room for now (at most
-- WAKE_BATCH when it has become unlimited). Returns how many woke.
function L.wake_if_room(resource)
  local capacity = redis.call('HGET', L.CAPACITIES, resource)
  if not capacity then
    return L.wake(resource, nil, nil)
  end
  capacity = tonumber(capacity)
  return L.wake(resource, capacity - tonumber(redis.call('HGET', L.USAGE, resource) or '0'), capacity)
end

-- Put the jobs set aside for global `resource` that fit its `capacity` (nil:
-- unlimited) back in line, each at the place its seq gives it (at most
-- WAKE_BATCH). Returns how many came back.
function L.bring_back(resource, capacity)
  if capacity == 0 or L.is_local(resource) then return 0 end
  local low, high = L.aside_range(resource, capacity)
  local members = redis.call('ZRANGEBYLEX', L.ASIDE, low, high, 'LIMIT', 0, L.WAKE_BATCH)
  for _, member in ipairs(members) do
    local _, _, seq, queue_name, jobid = L.aside_parts(member)
    redis.call('ZREM', L.ASIDE, member)
    L.park(jobid, resource, queue_name, seq)
  end
  return #members
end

-- The trail event of a job parked on `resource`: what holds it then, and its
-- capacity ('' for none: a worker-local one this pool declared none of).
function L.trail_parked(jobid, resource, room)
  local used, capacity
  if L.is_local(resource) then
    local have = room and room[resource]
    if have then used, capacity = have[2] - have[1], have[2] end
  else
    used = redis.call('HGET', L.USAGE, resource) or '0'
    capacity = redis.call('HGET', L.CAPACITIES, resource)
  end
  L.trail(jobid, 'parked', resource, used or '', capacity or '')
end

-- A claim that found nothing to claim looks for jobs of its queues set aside
-- for a worker-local resource this pool has enough of (any amount, for a
-- pool that declared none: to it they are unlimited), at most ASIDE_LOOK
-- per resource, smallest amount first, and takes the first it can.
function L.claim_aside(token, worker, local_room, room, first, count, spec)
  local index = {}
  for i = 0, count - 1 do index[ARGV[spec + 3 * i]] = i end
  local ranges = {}
  if room then
    for name in string.gmatch(local_room, '([^,=]+)=') do
      table.insert(ranges, {L.aside_range(name, room[name][2])})
    end
  else
    ranges[1] = {'[' .. L.LOCAL_PREFIX, '(' .. L.LOCAL_PREFIX .. L.LAST}
  end
  for _, range in ipairs(ranges) do
    for _, member in ipairs(redis.call('ZRANGEBYLEX', L.ASIDE, range[1], range[2], 'LIMIT', 0, L.ASIDE_LOOK)) do
      local _, _, seq, queue_name, jobid = L.aside_parts(member)
      local i = index[queue_name]
      if i and not L.is_paused(queue_name) and not L.too_big_here(L.parse_needs(L.job_of(jobid)[L.NEEDS]), room) then
        redis.call('ZREM', L.ASIDE, member)
        redis.call('HDEL', L.PARKING, jobid)
        local base = spec + 3 * i
        local claimed = L.consider(token, worker, room, i, KEYS[first + i], base, jobid, seq, nil, nil, nil)
        if type(claimed) == 'table' then return claimed end
      end
    end
  end
  return {'NONE'}
end

-- Replicas: a job whose node has alternative parents has one path to the
-- root per parent (records.encode_alternatives: the needs of each, joined
-- by ALTERNATIVES_SEP, the primary path first).

-- The needs text of each path of a job with alternatives, in order.
function L.paths_of(text)
  local paths = {}
  for path in string.gmatch(text, '[^' .. L.ALTERNATIVES_SEP .. ']+') do table.insert(paths, path) end
  return paths
end

-- The needs text of the first of a job's paths (`text`) that has room for
-- it now, tried in order as a plain job's needs are (too_big_here, then
-- blocker: a resource with older jobs in line has no room for it), or nil.
-- With none, it waits in line for the first full resource of each path
-- (park_lines), so that a release on any of its paths wakes it (wake: the
-- line that wakes it is the only one with room it took; it leaves the
-- others). A woken job is claimed again from its first path: it takes the
-- primary one if that has room by then. A path that needs more than a
-- capacity can never be taken: it waits in no line for it; if every path
-- does, it is set aside for the first such resource (bring_back puts it
-- back in line when that capacity is raised).
function L.take_path(jobid, text, room, queue_name, seq)
  local lines, seen, too_big = {}, {}, nil
  for _, path in ipairs(L.paths_of(text)) do
    local needs = L.parse_needs(path)
    local lacking, need, capacity = L.too_big_here(needs, room)
    if not lacking then lacking, need, capacity = L.blocker(needs, seq) end
    if not lacking then return path end
    if capacity then
      too_big = too_big or {lacking, need, capacity}
    elseif not seen[lacking] then
      seen[lacking] = true
      table.insert(lines, lacking)
    end
  end
  if #lines == 0 then
    L.set_aside(jobid, too_big[1], too_big[2], too_big[3], queue_name, seq)
    L.trail(jobid, 'aside', too_big[1], too_big[2], too_big[3])
  else
    L.park_lines(jobid, lines, queue_name, seq)
    L.trail_parked(jobid, lines[1], room)
  end
  return nil
end

-- Put a job in line for each of `resources`, all at its place `seq` (kept
-- from an earlier wait) or at the back; its parking value lists every
-- member, LINES_SEP between them (parking.encode_parked_lines).
function L.park_lines(jobid, resources, queue_name, seq)
  seq = L.new_seq(seq)
  local members = {}
  for i, resource in ipairs(resources) do
    members[i] = resource .. '|' .. seq .. '|' .. queue_name .. '|' .. jobid
    redis.call('ZADD', L.PARKED, 0, members[i])
  end
  redis.call('HSET', L.PARKING, jobid, 'P' .. table.concat(members, L.LINES_SEP))
end

-- A job in several lines left `member`'s (the caller took it out of
-- PARKED): `stay` keeps it in the others (its parking value lists them
-- without `member`; returns whether any is left), else it leaves them all.
function L.leave_lines(jobid, member, stay)
  local parking = redis.call('HGET', L.PARKING, jobid)
  if not parking or string.sub(parking, 1, 1) ~= 'P' then return false end
  local others = {}
  for other in string.gmatch(string.sub(parking, 2), '[^' .. L.LINES_SEP .. ']+') do
    if other ~= member then
      if stay then table.insert(others, other) else redis.call('ZREM', L.PARKED, other) end
    end
  end
  if #others == 0 then return false end
  redis.call('HSET', L.PARKING, jobid, 'P' .. table.concat(others, L.LINES_SEP))
  return true
end
