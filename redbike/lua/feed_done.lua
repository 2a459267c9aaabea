-- feed_done.lua: the feeder's look at its oldest outstanding jobs (feed.py).
-- Each that ended is taken off the feed's outstanding jobs and counted, done
-- or failed; one that ran to its end (END, or STP: StopWork) is removed at
-- once with all it left (status, schedule, record with its trail, error,
-- payload, and its entry among the last of the finished list) rather than keep-finished
-- later, so a feed of a billion items leaves only its outstanding jobs behind.
-- A failed one (DIE) is kept, for tell, explain and retry. One unset (no
-- status) is counted done; what it left is retired as any unset job's. One
-- waiting in the timeline (for a retry: RTY, EXP) goes to the back of the
-- line, so that it hides none behind it; queued and running ones keep their
-- place (they end about in the order they were fed).
-- Nothing here runs on a worker's or the dispatcher's path: finish.lua is
-- untouched, and the feeder calls this once per poll, for many jobs.
-- KEYS: the job-state keys, then the feed's hash, the feed's outstanding jobs.
-- ARGV: the common four, then most jobs to look at, how many entries at the
--       end of the finished list to look through, the rate in items ended
--       per second (shown by `redbike feeds`).
-- Returns {outstanding jobs left, done, failed} (the last two: by this call).
local feed, outstanding = KEYS[L.K + 1], KEYS[L.K + 2]
local most, window = L.int_of(ARGV[L.A + 1], 1, 100000), L.int_of(ARGV[L.A + 2], 0, 1000000)
local rate = tonumber(ARGV[L.A + 3])
if not most then return L.bad('most jobs', ARGV[L.A + 1]) end
if not window then return L.bad('window', ARGV[L.A + 2]) end
if not rate or rate ~= rate or rate < 0 or rate == math.huge then return L.bad('rate', ARGV[L.A + 3]) end
local ids = redis.call('ZRANGE', outstanding, 0, most - 1)
local last = redis.call('ZRANGE', outstanding, -1, -1, 'WITHSCORES')[2]
local back = (tonumber(last) or 0) + 1
local removed, wanted = {}, 0
local done, failed = 0, 0
for _, jobid in ipairs(ids) do
  local status = redis.call('HGET', L.STATUSES, jobid)
  local kind = status and string.sub(status, 1, 4)
  if kind == 'END:' or kind == 'STP:' then
    for _, key in ipairs({L.SCHEDULES, L.STATUSES, L.ERRORS, L.JOBS, L.DATA}) do
      redis.call('HDEL', key, jobid)
    end
    if kind == 'END:' then removed[jobid], wanted = true, wanted + 1 end
    done = done + 1
    redis.call('ZREM', outstanding, jobid)
  elseif kind == 'DIE:' then
    failed = failed + 1
    redis.call('ZREM', outstanding, jobid)
  elseif not status and redis.call('HEXISTS', L.LEASES, jobid) == 0 then
    done = done + 1
    redis.call('ZREM', outstanding, jobid)
  elseif kind ~= 'ENQ:' and kind ~= 'WRK:' then
    redis.call('ZADD', outstanding, back, jobid)
    back = back + 1
  end
end
if wanted > 0 and window > 0 then
  -- The finished list's entries of the jobs removed (END): they ended since
  -- the feeder last looked, so their entries are among the list's last. Its
  -- end is rewritten without them, looking further back (up to 64 times the
  -- window) while some are not found; any found nowhere (a job that ended
  -- long before a feeder started) is retire.lua's, as any job's: it finds
  -- nothing left of it.
  local size, entries, kept = window, nil, nil
  while true do
    entries, kept = redis.call('LRANGE', L.FINISHED, -size, -1), {}
    for _, entry in ipairs(entries) do
      if not removed[string.match(entry, '^[^|]*|(.*)$') or ''] then kept[#kept + 1] = entry end
    end
    if #entries - #kept >= wanted or #entries < size or size >= 64 * window then break end
    size = size * 4
  end
  if #kept < #entries then
    redis.call('LTRIM', L.FINISHED, 0, -#entries - 1)
    for i = 1, #kept, 1000 do
      redis.call('RPUSH', L.FINISHED, unpack(kept, i, math.min(i + 999, #kept)))
    end
  end
end
if done > 0 then redis.call('HINCRBY', feed, 'done', done) end
if failed > 0 then redis.call('HINCRBY', feed, 'failed', failed) end
redis.call('HSET', feed, 'rate', ARGV[L.A + 3], 'updated', L.NOW)
return {redis.call('ZCARD', outstanding), done, failed}
