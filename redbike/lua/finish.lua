-- finish.lua: end a run and, in the same round trip, claim the next job.
-- KEYS: the nine job-state keys, KEYS[10] = the finished job's queue, then the
--       queues to claim from (none: claim nothing).
-- ARGV: now, dispatcher channel, jobid, token, kind, at, status, error JSON
--       (or ''), queue channel of KEYS[10], then as claim.lua from ARGV[10]:
--       next token, worker id, control value seen, per-queue specs.
-- Returns {finish result, claim result}.
local done = finish(ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], KEYS[10], ARGV[9])
if type(done) == 'table' then return done end -- an error reply
local count = #KEYS - 10
if count == 0 then
  return {done, {'NONE'}}
end
return {done, claim(ARGV[10], ARGV[11], ARGV[12], 11, count, 13)}
