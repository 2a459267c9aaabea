-- claim.lua: claim one job from a worker's queues (see claim() in lib.lua).
-- KEYS: the job-state keys, then the queues in the order to try them.
-- ARGV: the common three, then token, worker id, control value seen,
--       worker-local room ("name=free/capacity,...", '' if none declared),
--       then per queue: name, timeout, seconds to the first lease deadline.
local failed = claim_error(ARGV[A + 1], ARGV[A + 2], ARGV[A + 4], K + 1, #KEYS - K, A + 5)
if failed then return failed end
return claim(ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4], K + 1, #KEYS - K, A + 5)
