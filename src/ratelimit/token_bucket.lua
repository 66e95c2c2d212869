-- devgate rate limiter: every window of one key, decided atomically in one round trip.
--
-- KEYS[1]  the key's bucket hash, hash-tagged by key id (`…rl:{<key id>}`), so one slot
--          holds it on Redis Cluster.
-- ARGV[1]  the call's cost (tokens);
-- ARGV[2i], ARGV[2i+1]  window i's capacity (tokens) and refill rate (tokens per ms).
-- Clock: Redis TIME (one clock for every replica). The hash stores per window the tokens
-- left (t<i>) and when they were counted (s<i>, ms); it expires once every bucket would be
-- full again, so idle keys cost no memory.
-- Returns {allowed (1/0), then per window: remaining (whole tokens after this call),
--          reset_ms (until full again), retry_ms (until this window has room; 0 if it has)}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cost = tonumber(ARGV[1])
local n = math.floor((#ARGV - 1) / 2)

local fields = {}
for i = 1, n do
  fields[#fields + 1] = 't' .. i
  fields[#fields + 1] = 's' .. i
end
local stored = redis.call('HMGET', KEYS[1], unpack(fields))

local tokens, caps, rates = {}, {}, {}
local allowed = 1
local ttl = 1000
for i = 1, n do
  local cap = tonumber(ARGV[2 * i])
  local rate = tonumber(ARGV[2 * i + 1])
  caps[i], rates[i] = cap, rate
  local left = tonumber(stored[2 * i - 1])
  local at = tonumber(stored[2 * i])
  if left == nil or at == nil then
    left, at = cap, now
  end
  left = math.min(cap, left + math.max(0, now - at) * rate)
  tokens[i] = left
  if left < cost then
    allowed = 0
  end
  local full = math.ceil(cap / rate)
  if full > ttl then
    ttl = full
  end
end

local out = { allowed }
local save = {}
for i = 1, n do
  local left = tokens[i]
  if allowed == 1 then
    left = left - cost
  end
  save[#save + 1] = 't' .. i
  save[#save + 1] = tostring(left)
  save[#save + 1] = 's' .. i
  save[#save + 1] = now
  out[#out + 1] = math.floor(left)
  out[#out + 1] = math.ceil((caps[i] - left) / rates[i])
  local retry = 0
  if allowed == 0 and left < cost then
    retry = math.ceil((cost - left) / rates[i])
  end
  out[#out + 1] = retry
end
redis.call('HSET', KEYS[1], unpack(save))
redis.call('PEXPIRE', KEYS[1], ttl)
return out
