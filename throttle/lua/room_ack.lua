-- Acknowledge released entries of one waiting room: published, so gone (see throttle/room.py).
--
-- KEYS[1]   <prefix>:~room:{<room>}     zset  entry -> release time
-- KEYS[2]   <prefix>:~room:{<room>}:m   hash  entry -> the parked message
-- KEYS[3]   <prefix>:~room:{<room>}:c   zset  entry -> claim expiry
-- ARGV      the entries
--
-- An entry parked again since its claim (its task came back and waits
-- again) keeps its new message.  Returns how many claims were acknowledged.

local done = 0
for _, id in ipairs(ARGV) do
  done = done + redis.call('ZREM', KEYS[3], id)
  if not redis.call('ZSCORE', KEYS[1], id) then
    redis.call('HDEL', KEYS[2], id)
  end
end
return done
