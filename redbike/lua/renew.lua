-- renew.lua: heartbeat: push back the deadlines of leases still held.
-- KEYS: the nine job-state keys.
-- ARGV: now, dispatcher channel, then triples (jobid, token, new deadline).
-- Returns the jobids whose lease was lost (reaped or unset).
local lost = {}
for j = 3, #ARGV, 3 do
  local jobid, token = ARGV[j], ARGV[j + 1]
  local lease = redis.call('HGET', LEASES, jobid)
  if lease and string.sub(lease, 1, #token + 1) == token .. '|' then
    redis.call('ZADD', DEADLINES, 'XX', ARGV[j + 2], jobid)
  else
    table.insert(lost, jobid)
  end
end
return lost
