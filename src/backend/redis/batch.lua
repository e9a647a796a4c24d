-- broadcaster's batch script: adds a batch of entries in order, in one round trip.
-- After an entry of a partition key fails, the key's later entries in the batch are not added:
-- they stay pending behind it, so a key's order survives a rejection.
-- KEYS[i]: stream of entry i. ARGV: MAXLEN (0: none), IDMP producer id ("": none), then per
-- entry: partition key ("": none), event id, field count n, n field/value pairs.
-- Replies the number of entries when all were added; otherwise, per entry: the entry id,
-- {'ERR', message}, or {'HELD'} (markers rather than nil or false, which RESP3 would turn into
-- other types).
local maxlen, producer = ARGV[1], ARGV[2]
local trim, idmp = maxlen ~= '0', producer ~= ''
local held, replies, a, all = {}, {}, 3, true
for i = 1, #KEYS do
  local key, id, n = ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first = a + 3
  a = first + 2 * n
  if key ~= '' and held[key] then
    replies[i] = {'HELD'}
    all = false
  else
    local reply
    if idmp and trim then
      reply = redis.pcall('XADD', KEYS[i], 'IDMP', producer, id, 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, a - 1))
    elseif idmp then
      reply = redis.pcall('XADD', KEYS[i], 'IDMP', producer, id, '*', unpack(ARGV, first, a - 1))
    elseif trim then
      reply = redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, first, a - 1))
    else
      reply = redis.pcall('XADD', KEYS[i], '*', unpack(ARGV, first, a - 1))
    end
    if type(reply) == 'table' and reply.err then
      if key ~= '' then held[key] = true end
      all = false
      -- As data, not as an error reply: clients fail a whole reply holding an error.
      reply = {'ERR', reply.err}
    end
    replies[i] = reply
  end
end
if all then return #KEYS end
return replies
