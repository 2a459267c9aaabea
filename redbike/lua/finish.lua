-- finish.lua: end a run and, in the same round trip, claim the next job.
-- KEYS: the job-state keys, then the finished job's queue, then the queues
--       to claim from (none: claim nothing).
-- ARGV: the common four, then jobid, token, the placement, error
--       JSON (or ''), queue channel of the finished job's queue, how many
--       occurrences already due the placement fires (cancelled if it gives
--       way: see finish() in lib.lua), the slot's tally of runs that ended
--       (records.encode_tally; '' for none), then as claim.lua: next token,
--       worker id, control value seen, worker-local room, per-queue specs.
-- Returns {finish result, the claim result's values...}: one flat array, which
-- Redis 6.2 writes in one system call (a nested one took two: see
-- records.decode_finish).
local count = #KEYS - L.K - 1
local failed, placement = L.finish_error(ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 3], ARGV[L.A + 4], ARGV[L.A + 6])
-- Most finishes carry no tally (a slot sends one a second at most).
if not failed and ARGV[L.A + 7] ~= '' and not L.is_tally(ARGV[L.A + 7]) then
  failed = L.bad('tally', ARGV[L.A + 7])
end
if not failed and count > 0 then
  failed = L.claim_error(ARGV[L.A + 8], ARGV[L.A + 9], ARGV[L.A + 11], L.K + 2, count, L.A + 12)
end
if failed then return failed end
local done = L.finish(ARGV[L.A + 1], ARGV[L.A + 2], placement, ARGV[L.A + 4], KEYS[L.K + 1], ARGV[L.A + 5],
  ARGV[L.A + 6])
if ARGV[L.A + 7] ~= '' then L.add_tally(ARGV[L.A + 7]) end
if count == 0 then
  return {done, 'NONE'}
end
local claimed = L.claim(ARGV[L.A + 8], ARGV[L.A + 9], ARGV[L.A + 10], ARGV[L.A + 11], L.K + 2, count, L.A + 12)
table.insert(claimed, 1, done)
return claimed
