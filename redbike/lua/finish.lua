-- finish.lua: end a run and, in the same round trip, claim the next job.
-- KEYS: the job-state keys, then the finished job's queue, then the queues
--       to claim from (none: claim nothing).
-- ARGV: the common three, then jobid, token, kind, at, status, error JSON
--       (or ''), queue channel of the finished job's queue, then as claim.lua:
--       next token, worker id, control value seen, worker-local room,
--       per-queue specs.
-- Returns {finish result, claim result}.
local count = #KEYS - L.K - 1
local failed = L.finish_error(ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 3], ARGV[L.A + 4], ARGV[L.A + 5], ARGV[L.A + 6])
if not failed and count > 0 then
  failed = L.claim_error(ARGV[L.A + 8], ARGV[L.A + 9], ARGV[L.A + 11], L.K + 2, count, L.A + 12)
end
if failed then return failed end
local done = L.finish(ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 3], ARGV[L.A + 4], ARGV[L.A + 5], ARGV[L.A + 6],
  KEYS[L.K + 1], ARGV[L.A + 7])
if type(done) == 'table' then return done end -- an error reply
if count == 0 then
  return {done, {'NONE'}}
end
return {done, L.claim(ARGV[L.A + 8], ARGV[L.A + 9], ARGV[L.A + 10], ARGV[L.A + 11], L.K + 2, count, L.A + 12)}
