-- capacity.lua: set a resource's capacity ('' for unlimited), put the jobs set
-- aside for it that now fit back in line (each at its old place), and wake as
-- many parked jobs as it now has room for. Lowering it below what is in use
-- lets running jobs finish and admits no new ones until usage is below it;
-- jobs in line that need more than the new capacity are set aside.
-- KEYS: the job-state keys.
-- ARGV: the common four, then resource, capacity.
-- Returns how many jobs woke, or came back in line if that was a full batch
-- (call again while it is 1000).
local resource, capacity = ARGV[L.A + 1], ARGV[L.A + 2]
if not L.is_resource(resource) then return L.bad('resource name', resource) end
if capacity ~= '' and not L.int_of(capacity, 0, L.MAX_CAPACITY) then return L.bad('capacity', capacity) end
if capacity == '' then
  redis.call('HDEL', L.CAPACITIES, resource)
else
  redis.call('HSET', L.CAPACITIES, resource, capacity)
end
local back = L.bring_back(resource, tonumber(capacity))
local woken = L.wake_if_room(resource)
if back >= L.WAKE_BATCH then return back end
return woken
