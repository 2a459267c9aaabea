-- renew.lua: heartbeat: push back the deadlines of leases still held.
-- KEYS: the job-state keys.
-- ARGV: the common four, then triples (jobid, token, new deadline).
-- Returns the jobids whose lease was lost (reaped or unset).
if (#ARGV - L.A) % 3 ~= 0 then return L.bad('count of lease values', #ARGV) end
for j = L.A + 1, #ARGV, 3 do
  if not L.time_of(ARGV[j + 2]) then return L.bad('deadline', ARGV[j + 2]) end
end
local lost = {}
for j = L.A + 1, #ARGV, 3 do
  local jobid, token = ARGV[j], ARGV[j + 1]
  if L.lease_token_matches(redis.call('HGET', L.LEASES, jobid), token) then
    redis.call('ZADD', L.DEADLINES, 'XX', ARGV[j + 2], jobid)
  else
    table.insert(lost, jobid)
  end
end
return lost
