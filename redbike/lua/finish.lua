-- finish.lua: end a run and, in the same round trip, claim the next job.
-- KEYS: the job-state keys, then the finished job's queue, then the queues
--       to claim from (none: claim nothing).
-- ARGV: the common three, then jobid, token, kind, at, status, error JSON
--       (or ''), queue channel of the finished job's queue, then as claim.lua:
--       next token, worker id, control value seen, worker-local room,
--       per-queue specs.
-- Returns {finish result, claim result}.
local count = #KEYS - K - 1
local failed = finish_error(ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4], ARGV[A + 5], ARGV[A + 6])
if not failed and count > 0 then
  failed = claim_error(ARGV[A + 8], ARGV[A + 9], ARGV[A + 11], K + 2, count, A + 12)
end
if failed then return failed end
local done = finish(ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4], ARGV[A + 5], ARGV[A + 6],
  KEYS[K + 1], ARGV[A + 7])
if type(done) == 'table' then return done end -- an error reply
if count == 0 then
  return {done, {'NONE'}}
end
return {done, claim(ARGV[A + 8], ARGV[A + 9], ARGV[A + 10], ARGV[A + 11], K + 2, count, A + 12)}
