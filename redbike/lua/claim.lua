-- claim.lua: claim one job from a worker's queues (see claim() in lib.lua).
-- KEYS: the nine job-state keys, then the queues in the order to try them.
-- ARGV: now, dispatcher channel, token, worker id, control value seen,
--       then per queue: name, timeout, seconds to the first lease deadline.
return claim(ARGV[3], ARGV[4], ARGV[5], 10, #KEYS - 9, 6)
