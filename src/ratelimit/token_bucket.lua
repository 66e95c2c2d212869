-- devgate rate limiter: every window of one key, and its tenant's monthly request quota,
-- decided atomically in one round trip.
--
-- KEYS[1]  the key's bucket hash;  KEYS[2]  the tenant's quota counter for this month.
--          Both are hash-tagged by tenant (`…rl:{<tenant>}:<key id>`, `…quota:{<tenant>}:…`),
--          so they share a slot on Redis Cluster. KEYS[2] is passed even when no quota is
--          checked (then it is neither read nor written), so the cluster can route the call.
-- ARGV[1]  the call's cost (tokens);
-- ARGV[2]  quota units the call uses (0: no quota check, KEYS[2] untouched);
-- ARGV[3]  the quota's limit;  ARGV[4]  the counter's expiry (ms since the epoch);
-- ARGV[3+2i], ARGV[4+2i]  window i's capacity (tokens) and refill rate (tokens per ms).
-- Clock: Redis TIME (one clock for every replica). The hash stores per window the tokens
-- left (t<i>) and when they were counted (s<i>, ms); it expires once every bucket would be
-- full again, so idle keys cost no memory. Nothing is taken unless both the buckets and the
-- quota have room.
-- Returns {rate_allowed (1/0), quota_allowed (1/0), quota_used (after the call),
--          then per window: remaining (whole tokens), reset_ms (until full), retry_ms}.
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local cost = tonumber(ARGV[1])
local units = tonumber(ARGV[2])
local n = math.floor((#ARGV - 4) / 2)

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
  local cap = tonumber(ARGV[3 + 2 * i])
  local rate = tonumber(ARGV[4 + 2 * i])
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

local quota_ok, used = 1, 0
if units > 0 then
  used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used + units > tonumber(ARGV[3]) then
    quota_ok = 0
  end
end
local admitted = allowed == 1 and quota_ok == 1
if admitted and units > 0 then
  used = redis.call('INCRBY', KEYS[2], units)
  if used == units then
    redis.call('PEXPIREAT', KEYS[2], ARGV[4])
  end
end

local out = { allowed, quota_ok, used }
local save = {}
for i = 1, n do
  local left = tokens[i]
  if admitted then
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
