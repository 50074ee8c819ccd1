"""The Lua scripts that make each shared rule one atomic step on the Redis server.

Money is integer nano-dollars (exact in Lua's doubles up to $9 million). Time is the Redis
server's own clock (`TIME`), so processes on machines whose clocks differ still agree.
A script that finds a spend counter missing (a new window, or a Redis that restarted empty)
answers `{-1}`: the caller seeds it from the ledger (`SET NX`) and runs the script again, so
a counter never silently starts from $0.
"""

from __future__ import annotations

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: daily, weekly, monthly spend; the day's client spend hash; holds hash; holds expiry zset
# ARGV: hold id, amount, client ('' for none), client cap (-1: none), the 3 limits (-1: none), hold ttl ms
# -> {ok (1/0), spent daily, weekly, monthly, held total, client spent, client held}
RESERVE = (
    _NOW
    + """
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1} end
end
local client = ARGV[3]
if client ~= '' and redis.call('HEXISTS', KEYS[4], '_seeded') == 0 then return {-1} end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now)) do
  redis.call('HDEL', KEYS[5], id)
  redis.call('ZREM', KEYS[6], id)
end
local held, cheld = 0, 0
local vals = redis.call('HVALS', KEYS[5])
for _, v in ipairs(vals) do
  local sep = string.find(v, '|', 1, true)
  local amount = tonumber(string.sub(v, 1, sep - 1))
  held = held + amount
  if client ~= '' and string.sub(v, sep + 1) == client then cheld = cheld + amount end
end
local spent = {}
for i = 1, 3 do spent[i] = tonumber(redis.call('GET', KEYS[i])) end
local cspent = 0
if client ~= '' then cspent = tonumber(redis.call('HGET', KEYS[4], client) or '0') end
local ok = 1
for i = 1, 3 do
  local limit = tonumber(ARGV[4 + i])
  if limit >= 0 and spent[i] + held >= limit then ok = 0 end
end
local cap = tonumber(ARGV[4])
if ok == 1 and cap >= 0 and cspent + cheld >= cap then ok = 2 end
if ok == 1 then
  redis.call('HSET', KEYS[5], ARGV[1], ARGV[2] .. '|' .. client)
  redis.call('ZADD', KEYS[6], now + tonumber(ARGV[8]), ARGV[1])
  redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[8]))
  redis.call('PEXPIRE', KEYS[6], tonumber(ARGV[8]))
  held = held + tonumber(ARGV[2])
  cheld = cheld + tonumber(ARGV[2])
end
return {ok, spent[1], spent[2], spent[3], held, cspent, cheld}
"""
)

# KEYS: holds hash, holds expiry zset. ARGV: pairs of (hold id, new amount; 0 drops the hold)
SET_HOLDS = """
for i = 1, #ARGV, 2 do
  local id, amount = ARGV[i], tonumber(ARGV[i + 1])
  local v = redis.call('HGET', KEYS[1], id)
  if v then
    if amount <= 0 then
      redis.call('HDEL', KEYS[1], id)
      redis.call('ZREM', KEYS[2], id)
    else
      local sep = string.find(v, '|', 1, true)
      redis.call('HSET', KEYS[1], id, ARGV[i + 1] .. string.sub(v, sep))
    end
  end
end
return 1
"""

# KEYS: daily, weekly, monthly spend; the day's client spend hash. ARGV: cost, client ('' for none)
# -> 1, or {-1} when a counter must be seeded first
RECORD = """
for i = 1, 3 do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {-1} end
end
if ARGV[2] ~= '' then
  if redis.call('HEXISTS', KEYS[4], '_seeded') == 0 then return {-1} end
  redis.call('HINCRBY', KEYS[4], ARGV[2], ARGV[1])
end
for i = 1, 3 do redis.call('INCRBY', KEYS[i], ARGV[1]) end
return 1
"""

# KEYS: the day's client spend hash. ARGV: ttl s, then pairs of (client, spent). Only if absent.
SEED_CLIENTS = """
if redis.call('HEXISTS', KEYS[1], '_seeded') == 1 then return 0 end
redis.call('HSET', KEYS[1], '_seeded', '1')
for i = 2, #ARGV, 2 do redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# KEYS: the key's bucket. ARGV: requests per minute. -> 0 (admitted) or ms until one is allowed
ADMIT = (
    _NOW
    + """
local cap = tonumber(ARGV[1])
local rate = cap / 60000.0
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens, at = tonumber(b[1]), tonumber(b[2])
if tokens == nil then tokens, at = cap, now end
tokens = math.min(cap, tokens + math.max(now - at, 0) * rate)
local wait = 0
if tokens < 1 then
  wait = math.ceil((1 - tokens) / rate)
else
  tokens = tokens - 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], 120000)
return wait
"""
)

# One tier's breaker (the rules of gateway/breaker.py, across processes). KEYS: its hash, its probe
# lease, the breakers' event channel. ARGV: op (acquire, success, failure, neutral, trip), ticket
# epoch, probe (0/1), bad answer (0/1), last resort (0/1), threshold, cooldown ms, probes to close,
# probe lease ms, ttl ms, tier id.
# -> {acquired (0 no, 1 ticket, 2 the probe's ticket), epoch, ms until half-open (-1 closed, 0 half-open),
#     opened for ('', bad_answers, failures), a probe is out (0/1), consecutive failures, version}
# Every change bumps `ver` (ms since the epoch at first) and is published on the channel as
# `tier|ver|epoch|left|opened for|failures`, so each process's mirror follows without asking.
BREAKER = (
    _NOW
    + """
local f = redis.call('HMGET', KEYS[1], 'epoch', 'failures', 'bad', 'opened_at', 'opened_for', 'psucc', 'ver')
local epoch, failures, bad = tonumber(f[1] or '0'), tonumber(f[2] or '0'), tonumber(f[3] or '0')
local opened_at, opened_for, psucc = tonumber(f[4] or '-1'), f[5] or '', tonumber(f[6] or '0')
-- A breaker's first change numbers itself from the clock: later than any earlier life of its hash
-- (expired, or a Redis restarted empty), so the mirrors never take the new changes for old ones.
local ver = tonumber(f[7] or tostring(now))
local op, tepoch, probe, isbad = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1', ARGV[4] == '1'
local threshold, cooldown, to_close = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local dirty, result = false, 0
local function reset(at, why)
  epoch = epoch + 1
  opened_at, opened_for, failures, bad, psucc, dirty = at, why, 0, 0, 0, true
  redis.call('DEL', KEYS[2])
end
local function open(for_bad)
  if for_bad then reset(now, 'bad_answers') else reset(now, 'failures') end
end
if op == 'acquire' then
  if opened_at < 0 then
    result = 1
  elseif now - opened_at >= cooldown and redis.call('SET', KEYS[2], '1', 'NX', 'PX', tonumber(ARGV[9])) then
    result = 2
  elseif ARGV[5] == '1' and opened_for == 'bad_answers' then
    result = 1
  end
elseif tepoch == epoch then
  if op == 'success' then
    if opened_at < 0 then
      if failures > 0 then failures, bad, dirty = 0, 0, true end
    elseif probe then
      redis.call('DEL', KEYS[2])
      psucc, dirty = psucc + 1, true
      if psucc >= to_close then reset(-1, '') end
    end
  elseif op == 'failure' then
    if opened_at < 0 then
      failures, dirty = failures + 1, true
      if isbad then bad = bad + 1 end
      if failures >= threshold then open(bad * 2 > failures) end
    elseif probe then
      open(isbad)
    end
  elseif op == 'neutral' then
    if probe then redis.call('DEL', KEYS[2]) end
  elseif op == 'trip' then
    if opened_at < 0 then open(bad * 2 > failures) end
  end
end
local left = -1
if opened_at >= 0 then left = math.max(opened_at + cooldown - now, 0) end
if dirty then
  ver = ver + 1
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'failures', failures, 'bad', bad,
             'opened_at', opened_at, 'opened_for', opened_for, 'psucc', psucc, 'ver', ver)
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[10]))
  redis.call('PUBLISH', KEYS[3], table.concat({ARGV[11], ver, epoch, left, opened_for, failures}, '|'))
end
return {result, epoch, left, opened_for, redis.call('EXISTS', KEYS[2]), failures, ver}
"""
)
