-- tally.lua: add a slot's tally of runs that ended to the totals (a slot
-- sends it with its finishes, and alone when it goes idle).
-- KEYS: the job-state keys.
-- ARGV: the common four, then the tally (records.encode_tally).
-- Returns the count of its lines.
local tally = ARGV[L.A + 1]
if not L.is_tally(tally) then return L.bad('tally', tally) end
return L.add_tally(tally)
