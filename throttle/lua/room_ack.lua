-- Acknowledge released entries of one waiting room: published, so gone (see throttle/room.py).
--
-- KEYS[1]   <prefix>:~room:{<room>}     zset  entry -> release time
-- KEYS[2]   <prefix>:~room:{<room>}:m   hash  entry -> the parked message
-- KEYS[3]   <prefix>:~room:{<room>}:c   zset  entry -> claim expiry
-- KEYS[4]   <prefix>:~room:{<room>}:p   hash  the room's plan (deleted with the room's last entry)
-- KEYS[5]   <prefix>:~room:{<room>}:s   zset  entry -> when it was parked
-- ARGV      the entries
--
-- An entry parked again since its claim (its task came back and waits
-- again) keeps its new message.  Returns how many claims were acknowledged.

local done = 0
for _, id in ipairs(ARGV) do
  done = done + redis.call('ZREM', KEYS[3], id)
  if not redis.call('ZSCORE', KEYS[1], id) then
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[5], id)
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[4])  -- the room is empty: no key left behind
end
return done
