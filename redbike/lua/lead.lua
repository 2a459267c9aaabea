-- lead.lua: take, keep or give up the dispatcher lease (one leader at a time).
-- KEYS: the job-state keys, then the fencing epoch counter.
-- ARGV: the common four, then token held ('' if none), lease ms ('0': give
--       it up), identity of this dispatcher.
-- Returns {token held or false, next due time, next lease deadline, control},
-- so that renewing the lease also tells the dispatcher when to wake next.
-- A new lease gets a new token, so a stalled former leader fails every
-- fenced script (see fence() in lib.lua).
local held, ms, identity = ARGV[L.A + 1], L.int_of(ARGV[L.A + 2], 0, 86400000), ARGV[L.A + 3]
if not ms then return L.bad('lease ms', ARGV[L.A + 2]) end
if not L.is_name(identity) then return L.bad('dispatcher identity', identity) end
local current = redis.call('GET', L.DISPATCHER)
if ms == 0 then
  if current and current == held then redis.call('DEL', L.DISPATCHER) end
  return false
end
local token = false
if current then
  if current == held then
    redis.call('PEXPIRE', L.DISPATCHER, ms)
    token = held
  end
else
  token = redis.call('INCR', KEYS[L.K + 1]) .. ':' .. identity
  redis.call('SET', L.DISPATCHER, token, 'PX', ms)
end
local due = redis.call('ZRANGE', L.TIMELINE, 0, 0, 'WITHSCORES')[2] or false
local deadline = redis.call('ZRANGE', L.DEADLINES, 0, 0, 'WITHSCORES')[2] or false
return {token, due, deadline, redis.call('GET', L.CONTROL)}
