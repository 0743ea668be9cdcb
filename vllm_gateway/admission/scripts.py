"""Admission's decisions as Lua scripts, which Redis runs atomically (admission/shared.py calls them).

The data, under the gateway's prefix P:
- P:inflight:<server>   hash: `total`, and each worker's share of it, so a dead worker's can be taken back
- P:q:<model>:size      requests waiting for the model, over all workers
- P:q:<model>:turns     the keys that wait, the first has the turn (deficit round robin)
- P:q:<model>:key:<key> that key's tickets, first in first out; a ticket is `worker|sequence`
- P:q:<model>:deficit, :weight   hashes by key: what the key may still send in its turn, its weight
- P:granted:<worker>    hash: tickets handed to that worker's requests and not yet taken up
- P:alive:<worker>      a key that expires: the worker lives; P:workers, P:backends, P:models: sets
"""

# -- the scripts (Lua, run by Redis atomically). ARGV[1] is the gateway's key prefix, ARGV[2] the model
# where there is one; the model's ready servers come last, as (id, capacity) pairs (-1: no limit). --

COMMON = """
local P = ARGV[1]
local function q(m, part) return P .. ':q:' .. m .. ':' .. part end
local function alive(w) return redis.call('EXISTS', P .. ':alive:' .. w) == 1 end
local function worker_of(ticket) return string.match(ticket, '^([^|]+)') end

-- The server with room and the fewest in flight, of the (id, capacity) pairs from ARGV[first].
local function pick(first)
  local best, fewest = nil, nil
  for i = first, #ARGV, 2 do
    local cap = tonumber(ARGV[i + 1])
    local n = tonumber(redis.call('HGET', P .. ':inflight:' .. ARGV[i], 'total') or '0')
    if (cap < 0 or n < cap) and (fewest == nil or n < fewest) then best, fewest = ARGV[i], n end
  end
  return best
end

local function take(backend, worker)
  local h = P .. ':inflight:' .. backend
  redis.call('HINCRBY', h, 'total', 1)
  redis.call('HINCRBY', h, worker, 1)
  redis.call('SADD', P .. ':backends', backend)
end

-- Never below zero: a worker taken for dead while it lived had its counts removed already.
local function give_back(backend, worker)
  local h = P .. ':inflight:' .. backend
  if tonumber(redis.call('HGET', h, worker) or '0') > 0 then
    redis.call('HINCRBY', h, worker, -1)
    redis.call('HINCRBY', h, 'total', -1)
  end
end

local function forget_key(m, k)
  redis.call('LREM', q(m, 'turns'), 1, k)
  redis.call('HDEL', q(m, 'deficit'), k)
  redis.call('HDEL', q(m, 'weight'), k)
end

-- Turns of `w` each that a key with deficit `d` needs before it may send (admission.turns_to_send).
local function turns_to_send(d, w)
  local n = math.max(1, math.ceil((1 - d) / w))
  if n > 1 and d + (n - 1) * w >= 1 then n = n - 1 end
  if d + n * w < 1 then n = n + 1 end
  return n
end

-- The keys take turns until one has a whole request to send, which becomes first; the turns are
-- counted, not taken one by one, so no weight makes this loop (admission.ModelQueue.next_turn).
-- Returns that key and its deficit.
local function next_turn(m)
  local turns, deficit, weight = q(m, 'turns'), q(m, 'deficit'), q(m, 'weight')
  local first = redis.call('LINDEX', turns, 0)
  local credit = tonumber(redis.call('HGET', deficit, first)) + tonumber(redis.call('HGET', weight, first))
  if credit >= 1 then  -- the usual case: a weight of 1 or more
    redis.call('HSET', deficit, first, credit)
    return first, credit
  end
  local keys = redis.call('LRANGE', turns, 0, -1)
  local d, w, rounds, winner = {}, {}, nil, 1
  for i, k in ipairs(keys) do
    d[i] = tonumber(redis.call('HGET', deficit, k))
    w[i] = tonumber(redis.call('HGET', weight, k))
    local n = turns_to_send(d[i], w[i])
    if rounds == nil or n < rounds then rounds, winner = n, i end
  end
  for i, k in ipairs(keys) do
    local n = rounds
    if i > winner then n = rounds - 1 end
    d[i] = d[i] + n * w[i]
    redis.call('HSET', deficit, k, d[i])
  end
  for _ = 2, winner do redis.call('RPUSH', turns, redis.call('LPOP', turns)) end
  return keys[winner], d[winner]
end

-- The next ticket by deficit round robin (admission.ModelQueue.pop, step for step).
local function pop(m)
  local turns = q(m, 'turns')
  local k = redis.call('LINDEX', turns, 0)
  if not k then return nil end
  local d = tonumber(redis.call('HGET', q(m, 'deficit'), k))
  if d < 1 then k, d = next_turn(m) end
  d = d - 1
  local line = q(m, 'key:' .. k)
  local ticket = redis.call('LPOP', line)
  redis.call('DECR', q(m, 'size'))
  if redis.call('LLEN', line) == 0 then
    forget_key(m, k)  -- a key that stops waiting keeps no credit
  else
    redis.call('HSET', q(m, 'deficit'), k, d)
    if d < 1 then redis.call('RPUSH', turns, redis.call('LPOP', turns)) end
  end
  return ticket
end

-- Room to tickets, in turn, each recorded in its worker's granted hash. The caller's own ticket
-- (`mine`) is returned; other tickets of the calling worker (`me`) are added to `own`, for the
-- script's answer; another worker's are published on its channel.
local own = {}
local function dispatch(m, first, mine, me)
  local got = nil
  while tonumber(redis.call('GET', q(m, 'size')) or '0') > 0 do
    local backend = pick(first)
    if not backend then break end
    local ticket = pop(m)
    if not ticket then break end
    local worker = worker_of(ticket)
    if alive(worker) then
      take(backend, worker)
      if ticket == mine then
        got = backend
      else
        redis.call('HSET', P .. ':granted:' .. worker, ticket, backend .. '\\n' .. m)
        if worker == me then
          own[#own + 1] = ticket
          own[#own + 1] = backend
        else
          redis.call('PUBLISH', P .. ':admit:' .. worker, ticket .. '\\n' .. backend .. '\\n' .. m)
        end
      end
    end
  end
  return got
end

-- A script's answer: its status, then the (ticket, server) pairs granted to the caller's tickets.
local function answer(...)
  local reply = {...}
  for _, item in ipairs(own) do reply[#reply + 1] = item end
  return reply
end

-- What Redis holds of worker `w`: its slots go back, its grants and tickets are dropped.
local function forget(w)
  for _, backend in ipairs(redis.call('SMEMBERS', P .. ':backends')) do
    local h = P .. ':inflight:' .. backend
    local n = tonumber(redis.call('HGET', h, w) or '0')
    if n > 0 then redis.call('HINCRBY', h, 'total', -n) end
    redis.call('HDEL', h, w)
  end
  redis.call('DEL', P .. ':granted:' .. w)
  redis.call('SREM', P .. ':workers', w)
  for _, m in ipairs(redis.call('SMEMBERS', P .. ':models')) do
    for _, k in ipairs(redis.call('LRANGE', q(m, 'turns'), 0, -1)) do
      local line = q(m, 'key:' .. k)
      for _, ticket in ipairs(redis.call('LRANGE', line, 0, -1)) do
        if worker_of(ticket) == w then
          redis.call('LREM', line, 1, ticket)
          redis.call('DECR', q(m, 'size'))
        end
      end
      if redis.call('LLEN', line) == 0 then forget_key(m, k) end
    end
  end
end

-- Workers whose alive key expired are forgotten; true when there was one (its slots are free now).
local function reap()
  local reaped = false
  for _, w in ipairs(redis.call('SMEMBERS', P .. ':workers')) do
    if not alive(w) then
      forget(w)
      reaped = true
    end
  end
  return reaped
end
"""

SCRIPTS = {
    # ARGV: prefix, model, worker, ticket, key, weight, queue limit, servers. Every script that hands
    # out room answers its status first, then the grants to the caller's other tickets (answer).
    "acquire": """
local m, worker, ticket, k, weight, limit = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local size = tonumber(redis.call('GET', q(m, 'size')) or '0')
if size == 0 then  -- nobody waits, so nobody is overtaken
  local backend = pick(8)
  if backend then
    take(backend, worker)
    return {'ok', backend}
  end
end
if size >= limit then return {'full', ''} end
local line = q(m, 'key:' .. k)
if redis.call('LLEN', line) == 0 then
  redis.call('RPUSH', q(m, 'turns'), k)
  redis.call('HSET', q(m, 'deficit'), k, 0)
end
redis.call('HSET', q(m, 'weight'), k, weight)  -- the key's weight as of its latest request
redis.call('RPUSH', line, ticket)
redis.call('INCR', q(m, 'size'))
redis.call('SADD', P .. ':models', m)
local got = dispatch(m, 8, ticket, worker)
if got then return answer('ok', got) end
return answer('queued', '')
""",
    # ARGV: prefix, model, worker, server, servers.
    "release": """
give_back(ARGV[4], ARGV[3])
dispatch(ARGV[2], 5, nil, ARGV[3])
return answer(1)
""",
    # ARGV: prefix, model, worker, ticket, key ('' for a grant nobody waits for), servers. Out of its
    # key's line; or, when it was granted meanwhile, its slot goes to the next in turn.
    "cancel": """
local m, worker, ticket, k = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local line = q(m, 'key:' .. k)
if k ~= '' and redis.call('LREM', line, 1, ticket) == 1 then
  redis.call('DECR', q(m, 'size'))
  if redis.call('LLEN', line) == 0 then forget_key(m, k) end
  return {1}
end
local grant = redis.call('HGET', P .. ':granted:' .. worker, ticket)
if grant then
  redis.call('HDEL', P .. ':granted:' .. worker, ticket)
  give_back(string.match(grant, '^([^\\n]+)'), worker)
  dispatch(m, 6, nil, worker)
  return answer(2)
end
return {0}
""",
    # ARGV: prefix, model, worker, servers: a server came up, or the config changed.
    "dispatch": """
dispatch(ARGV[2], 4, nil, ARGV[3])
return answer(1)
""",
    # ARGV: prefix, worker, seconds to live, models: this worker lives on, the dead are reaped, and
    # the answer is whether one was (its slots are free now: the caller hands them out), then each
    # model's waiting requests over all workers.
    "heartbeat": """
redis.call('SET', P .. ':alive:' .. ARGV[2], '1', 'EX', tonumber(ARGV[3]))
redis.call('SADD', P .. ':workers', ARGV[2])
local sizes = {0}
if reap() then sizes[1] = 1 end
for i = 4, #ARGV do sizes[#sizes + 1] = tonumber(redis.call('GET', q(ARGV[i], 'size')) or '0') end
return sizes
""",
    # ARGV: prefix, worker, seconds to live, then (server, requests) pairs: a worker's first script on
    # a new connection. What Redis knew of it is replaced by what it holds: Redis may have restarted
    # empty, or been told of commands whose answers the old connection lost, or have reaped the
    # worker while it could not beat. Its tickets leave the queues (its waiting requests were
    # answered when the connection dropped).
    "join": """
forget(ARGV[2])
for i = 4, #ARGV, 2 do
  local n = tonumber(ARGV[i + 1])
  if n > 0 then
    local h = P .. ':inflight:' .. ARGV[i]
    redis.call('HINCRBY', h, 'total', n)
    redis.call('HSET', h, ARGV[2], n)
    redis.call('SADD', P .. ':backends', ARGV[i])
  end
end
redis.call('SET', P .. ':alive:' .. ARGV[2], '1', 'EX', tonumber(ARGV[3]))
redis.call('SADD', P .. ':workers', ARGV[2])
return 1
""",
    # ARGV: prefix. A worker that leaves deletes its alive key first.
    "reap": """
reap()
return 1
""",
}
