-- claim.lua: claim one job from a worker's queues (see claim() in lib.lua).
-- KEYS: the job-state keys, then the queues in the order to try them.
-- ARGV: the common four, then token, worker id, control value seen,
--       worker-local room ("name=free/capacity,...", '' if none declared),
--       then per queue: name, timeout, seconds to the first lease deadline.
local failed = L.claim_error(ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 4], L.K + 1, #KEYS - L.K, L.A + 5)
if failed then return failed end
return L.claim(ARGV[L.A + 1], ARGV[L.A + 2], ARGV[L.A + 3], ARGV[L.A + 4], L.K + 1, #KEYS - L.K, L.A + 5)
