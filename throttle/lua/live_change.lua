-- One live change of one limit, scheduled atomically (see throttle/live.py).
--
-- KEYS[1]   <prefix>:~{live}:overrides   limit -> JSON {"rate", "burst", "mode", "concurrency"}
-- KEYS[2]   <prefix>:~{live}:versions    limit -> how many times it changed
-- KEYS[3]   <prefix>:~{live}:pending     limit -> JSON {"at", "version", "override"}
-- ARGV[1]   the limit's name
-- ARGV[2]   what to do: "set", "unset" or "bump"
-- ARGV[3]   the delay until the change takes effect, microseconds
-- ARGV[4]   TTL of the versions and pending hashes, seconds
-- ARGV[5..8] for "set": rate, burst, mode, concurrency ("" leaves the current override's value)
--
-- Returns one of
--   {"wait", microseconds}  a change of this limit is still pending: nothing is
--                           written; call again once it has taken effect, so
--                           every worker passes through every version in turn
--   {"none", 0}             "unset" of a limit with no override: nothing written
--   {"ok", version}         scheduled; the limit's new version
--
-- The three hashes share the {live} hash tag: one node runs it, on its clock.

local name, op = ARGV[1], ARGV[2]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local pending = redis.call('HGET', KEYS[3], name)
if pending then
  local ok, decoded = pcall(cjson.decode, pending)
  local at = ok and type(decoded) == 'table' and tonumber(decoded['at'])
  if at and at > now then
    return {'wait', at - now}
  end
end

local current = redis.call('HGET', KEYS[1], name)
if op == 'unset' and not current then
  return {'none', 0}
end

-- What is in force now stays until the change takes effect.
local version = tonumber(redis.call('HGET', KEYS[2], name) or '0') or 0
local at = now + tonumber(ARGV[3])
redis.call('HSET', KEYS[3], name,
  '{"at":' .. string.format('%d', at) .. ',"version":' .. string.format('%d', version) ..
  ',"override":' .. (current or 'null') .. '}')

if op == 'set' then
  local merged = {}
  if current then
    local ok, decoded = pcall(cjson.decode, current)
    if ok and type(decoded) == 'table' then merged = decoded end
  end
  if ARGV[5] ~= '' then merged['rate'] = ARGV[5] end
  if ARGV[6] ~= '' then merged['burst'] = tonumber(ARGV[6]) end
  if ARGV[7] ~= '' then merged['mode'] = ARGV[7] end
  if ARGV[8] and ARGV[8] ~= '' then merged['concurrency'] = tonumber(ARGV[8]) end
  redis.call('HSET', KEYS[1], name, cjson.encode(merged))
elseif op == 'unset' then
  redis.call('HDEL', KEYS[1], name)
end

local new_version = redis.call('HINCRBY', KEYS[2], name, 1)
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[4]))
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4]))
return {'ok', new_version}
