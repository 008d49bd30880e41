-- One room's admission state in Redis: the same rules as
-- src/room/admission.rs, applied atomically for every node at once.
-- KEYS: 1 state hash, 2 batches list ("at:from:to:claimed"), 3 claimed
-- zset (score = ticket number), 4 sessions zset (score = expiry ms),
-- 5 history list ("at:serving"), 6 provisional blocks hash (epoch -> base),
-- 7 ended sessions zset (score = when to forget them, ms), 8 pace list
-- ("at:called", one per tick that found people waiting, called counted
-- since the line formed: see AdmissionState::pace), 9 numbers given back
-- before they were called (zset, score = the number: see 'void'); for
-- 'issue' and 'void' only, 10.. one key per issue ("gen:number", for
-- five minutes), named by the node that asked.
-- Every time in it (now, expiries, when to forget) is on Redis's clock:
-- each node runs on it (src/store/skew.rs), measured at its start and at
-- each tick. (A node that could not reach Redis at its start calls this
-- script only once a tick has measured it.)
-- ARGV: 1 op, 2 now ms, 3 per_minute (< 0: none), 4 max_active (< 0: none),
-- 5 claim_window ms, 6 tick ms, 7 opens_at ms (< 0: none), 8 mode, what
-- the asking node last saw of the state: 9 its generation ('' : nothing
-- yet), 10 queue, 11 pre-queue; 12.. op args ('tick': 12 the room's
-- session_idle ms, 0 or none: not known).
-- Returns {result, detail, queue, serving, prequeue, opened, active,
-- reserved, rate (milli per second), admitted, abandoned, {lottery kid,
-- the state's generation, the floor (numbers at or below it can no
-- longer claim), the pace (milli per second), how many session ids
-- follow, those ids (the
-- sessions a 'touch' found gone), then, for a 'tick', 'view' or
-- 'reserve' (every node makes one of the first two each tick), the
-- provisional blocks as a flat epoch, base list}}.
-- The provisional blocks hash also holds, under '~' .. epoch, when a
-- block may be forgotten (ms): every ticket of it has expired by then.
-- A 'tick' drops those past it, so the hash does not grow without end.
local st, batches, claimed, sess, hist, prov, ended, pace, void = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local op = ARGV[1]
local now = tonumber(ARGV[2])
local per_minute = tonumber(ARGV[3])
local max_active = tonumber(ARGV[4])
local claim_window = tonumber(ARGV[5])
local tick_ms = tonumber(ARGV[6])
local opens_at = tonumber(ARGV[7])
local mode = ARGV[8]
local INF = 1e300
-- A time this far ahead of now was stamped before the clock stepped
-- back (STEPPED_BACK_MS in src/room/admission.rs).
local STEPPED_BACK = 5000

local raw = redis.call('HGETALL', st)
local h = {}
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local burst = INF
if per_minute >= 0 then burst = per_minute * tick_ms / 60000 + 1 end
local queue = tonumber(h.queue or '0')
local serving = tonumber(h.serving or '0')
local prequeue = tonumber(h.prequeue or '0')
local opened = h.opened
-- Ops about one session are sent without the room's limits (opens_at -1):
-- one that finds no state (Redis lost its data) must not decide that the
-- room has opened, or a scheduled room would open at once, its pre-queue
-- never drawn. The first op that knows the opening decides.
local knows_opening = not (op == 'peek' or op == 'check' or op == 'end' or op == 'handover'
  or op == 'void')
local opened_known = opened ~= nil or knows_opening
if opened == nil then
  if opens_at < 0 or now >= opens_at then opened = '1' else opened = '0' end
end
local tokens = tonumber(h.tokens or tostring(math.min(burst, 1)))
local refilled = tonumber(h.refilled or string.format('%d', now))
local floor = tonumber(h.floor or '0')
local admitted = tonumber(h.admitted or '0')
local abandoned = tonumber(h.abandoned or '0')
-- When this room's state was created: a new value means the counters
-- started again (Redis lost its data), so nodes take the new ones as they
-- are instead of keeping the higher ones they had seen.
local gen = h.gen or string.format('%d', now)
-- Until when nobody is admitted (ms) after Redis lost its data: the
-- sessions are gone with it, and each node reports its own again only at
-- the tick after it hears of the loss (its next reply names the new
-- generation). Until then a room that looks empty may be full, and
-- admitting into it would put up to another max_active on the portal.
-- Three ticks cover a node that ticked just before the loss; five
-- seconds at least, a node whose connection broke with the loss (a
-- Redis restarted) getting back to it (a timeout, a reconnection, one
-- replacement a second) whatever the tick. Set when a node that saw the
-- lost state finds none: a node that never saw one cannot tell a loss
-- from a first start.
local hold = tonumber(h.hold or '0')
if not h.gen and ARGV[9] ~= '' and ARGV[9] ~= '0' then
  hold = now + math.max(3 * tick_ms, 5000)
end
-- Redis that lost its last writes (a restart from an older save, a
-- failover to a replica that was behind) comes back with the same
-- generation and counters behind numbers already handed out. The first
-- node that asks raises them to what it saw, so no number it saw is
-- handed out twice (one only another node saw can be, if this one asks
-- first). The pre-queue only before the opening, whose draw is over its
-- size; the queue only after it, which adds the pre-queue to it.
if h.gen and ARGV[9] == h.gen then
  if h.opened == '1' then
    queue = math.max(queue, tonumber(ARGV[10]))
  elseif h.opened == '0' then
    prequeue = math.max(prequeue, tonumber(ARGV[11]))
  end
end
-- When a node last ticked this room (or an op caught up after a gap).
local ticked = tonumber(h.ticked or string.format('%d', now))
-- When a node last reported its sessions (its tick's touch, then view or
-- tick): state written before this field existed counts from its tick.
local seen = tonumber(h.seen or h.ticked or string.format('%d', now))
-- A clock stepped back (Redis's host's, which every node runs on: NTP,
-- a failover to a replica on a host behind) leaves each time stamped
-- before it ahead of now: a called turn would hold its slot for its
-- claim window plus the step, a session for its idle time plus the
-- step, no token would come, and a full room would admit nobody for as
-- long (the memory store mends the same: AdmissionState, MemoryRoom's
-- purge). The ticker finds the step by its own last tick, and the
-- sessions are mended at each tick until the clock is back where it was
-- ('stepped'): a node that has not measured the step yet may still send
-- a time from before it. Only then: out of a step, an expiry far ahead
-- is another node's longer session_idle (a config being rolled out).
local stepped = tonumber(h.stepped or '0')
if op == 'tick' and ticked > now + STEPPED_BACK then
  stepped = math.max(stepped, ticked)
  ticked = now
  -- Or an outage during the step would not be told from the gap
  -- between reports (catch_up), and sessions would lapse in it; and a
  -- hold after a loss would last the step longer.
  seen = math.min(seen, now)
  hold = math.min(hold, now + math.max(3 * tick_ms, 5000))
end
-- When this line first found the room full ('': not yet), and whether
-- its pace is worth telling since (see AdmissionState::pace_full).
local pace_full, pace_settled = h.pfull or '', h.psettled or '0'

local function parse(b)
  local at, f, t, c = string.match(b, '^(%d+):(%d+):(%d+):(%d+)$')
  return tonumber(at), tonumber(f), tonumber(t), tonumber(c)
end
local function fmt(at, f, t, c)
  return string.format('%d:%d:%d:%d', at, f, t, c)
end
local function maybe_open()
  if opened == '1' then return end
  if opens_at >= 0 and now < opens_at then return end
  opened = '1'
  queue = queue + prequeue
  -- A Redis back from before the opening (same generation) opens again
  -- here, below numbers the asking node saw handed out after it: those
  -- are not handed out twice. (Before the opening a node has seen no
  -- queue: 0.)
  if h.gen and ARGV[9] == h.gen then
    queue = math.max(queue, tonumber(ARGV[10]))
  end
end
local function refill()
  if now + STEPPED_BACK < refilled then refilled = now end
  local elapsed = now - refilled
  if elapsed < 0 then elapsed = 0 end
  if now > refilled then refilled = now end
  if per_minute >= 0 then tokens = math.min(tokens + per_minute * elapsed / 60000, burst) end
end
-- Nobody could claim a called turn while no node could tick (Redis or
-- every node down): time past a few ticks without one counts against no
-- claim window, as a single node's restart does not. Nor against a
-- session's idle time while no node could report its sessions (Redis
-- away, or too slow for the nodes' ticks, though a quick op may get
-- through): the nodes kept serving them, so a session alive then is as
-- alive now, and counts against max_active until its nodes' reports
-- arrive. (A lease moving from a dead holder stops the ticks, not the
-- other nodes' reports: sessions are not shifted for that.)
-- Only a tick moves the claim windows on past such a gap: the ticker
-- measures it with its own clock. A node whose clock ran ahead of the
-- ticker's would otherwise see a gap at every other op, and keep pushing
-- every called turn's window into the future: no turn would ever lapse.
-- Only batches called before the gap: one made during it (arrivals
-- admitted at once when the nodes came back, before their first tick)
-- froze for no time, and pushed past the gap it would hold every turn
-- called after it open that long (expiry stops at the first open batch).
-- The list is then out of time order: a batch made during the gap waits
-- behind the shifted ones to be dropped, which costs nothing, as such
-- batches are direct admissions, claimed whole.
local function catch_up()
  local gap = now - ticked
  if op == 'tick' and gap > 5 * tick_ms then
    local shift = gap - tick_ms
    for i, b in ipairs(redis.call('LRANGE', batches, 0, -1)) do
      local at, f, t, c = parse(b)
      if at <= ticked then
        redis.call('LSET', batches, i - 1, fmt(at + shift, f, t, c))
      end
    end
    ticked = now - tick_ms
  end
  local quiet = now - seen
  if quiet > 5 * tick_ms then
    local shift = quiet - tick_ms
    local alive = redis.call('ZRANGEBYSCORE', sess, '(' .. string.format('%d', seen), '+inf', 'WITHSCORES')
    for i = 1, #alive, 2 do
      redis.call('ZADD', sess, tonumber(alive[i + 1]) + shift, alive[i])
    end
    seen = now - tick_ms
  end
end
-- Before any op reads a session or a batch.
catch_up()
-- How far the claim windows have run for this op: to now, but for an op
-- that is not a tick no further than a tick past the last tick while
-- none has come for five (nobody could claim meanwhile; or this node's
-- clock runs ahead of the ticker's, and the ticker's clock decides).
local windows_at = now
if op ~= 'tick' and now - ticked > 5 * tick_ms then windows_at = ticked + tick_ms end
local function expire()
  while true do
    local b = redis.call('LINDEX', batches, 0)
    if not b then break end
    local at, f, t, c = parse(b)
    if at + claim_window > windows_at then break end
    redis.call('LPOP', batches)
    abandoned = abandoned + (t - f + 1 - c)
    if t > floor then floor = t end
  end
  redis.call('ZREMRANGEBYSCORE', claimed, '-inf', floor)
end
local function reserved()
  local r = 0
  for _, b in ipairs(redis.call('LRANGE', batches, 0, -1)) do
    local _, f, t, c = parse(b)
    r = r + (t - f + 1 - c)
  end
  return r
end
local function active()
  redis.call('ZREMRANGEBYSCORE', sess, '-inf', now)
  return redis.call('ZCARD', sess)
end
local function free()
  if max_active < 0 then return INF end
  if now < hold then return 0 end
  return max_active - active() - reserved()
end
local function budget()
  if per_minute < 0 then return INF end
  return math.floor(math.max(tokens, 0))
end

-- See 'stepped' above. Turns and the admission history by their own
-- times, as AdmissionState does: a node's time is never that far ahead
-- of the ticker's on one clock.
local function mend_step_back()
  local last = redis.call('LINDEX', batches, -1)
  if last and parse(last) > now + STEPPED_BACK then
    for i, b in ipairs(redis.call('LRANGE', batches, 0, -1)) do
      local at, f, t, c = parse(b)
      if at > now then redis.call('LSET', batches, i - 1, fmt(now, f, t, c)) end
    end
  end
  last = redis.call('LINDEX', hist, -1)
  if last and tonumber(string.match(last, '^(%d+):')) > now + STEPPED_BACK then
    redis.call('DEL', hist)
  end
  if stepped == 0 then return end
  if now >= stepped then
    stepped = 0
    return
  end
  local idle = tonumber(ARGV[12] or '0') or 0
  if idle <= 0 then return end
  local late = redis.call('ZRANGEBYSCORE', sess,
    '(' .. string.format('%d', now + 2 * idle + STEPPED_BACK), '+inf')
  for _, s in ipairs(late) do
    redis.call('ZADD', sess, string.format('%d', now + idle), s)
  end
end

local result, detail = 0, 0
local gone = {}
if op == 'issue' then
  maybe_open()
  if opened == '1' then
    queue = queue + 1
    result, detail = 1, queue
    -- Kept a while under the node's name for this issue: should the
    -- answer be lost, the node gives the number back ('void').
    if KEYS[10] then
      redis.call('SET', KEYS[10], gen .. ':' .. string.format('%d', queue), 'PX', 300000)
    end
  else
    prequeue = prequeue + 1
    result, detail = 2, prequeue
  end
elseif op == 'direct' then
  maybe_open()
  -- A session ended already is one the asking node refused, its answer
  -- lost, and the end overtook the script (sent again on a connection
  -- made since): made now, nobody would hold it, nor end it again.
  if mode == 'queue' and opened == '1' and queue == serving
    and not redis.call('ZSCORE', ended, ARGV[12]) then
    -- A lane at no share keeps its mark (AdmissionState::admit_directly).
    if per_minute ~= 0 then refill() end
    expire()
    if free() > 0 and budget() > 0 then
      if per_minute >= 0 then tokens = tokens - 1 end
      queue = queue + 1
      serving = serving + 1
      admitted = admitted + 1
      local last = redis.call('LINDEX', batches, -1)
      local merged = false
      if last then
        local at, f, t, c = parse(last)
        if t + 1 == serving and at + tick_ms > now then
          redis.call('LSET', batches, -1, fmt(at, f, serving, c + 1))
          merged = true
        end
      end
      if not merged then redis.call('RPUSH', batches, fmt(now, serving, serving, 1)) end
      redis.call('ZADD', claimed, serving, serving)
      redis.call('ZADD', sess, tonumber(ARGV[13]), ARGV[12])
      result = serving
    end
  end
elseif op == 'claim' then
  -- ARGV 12 number, 13 session id, 14 its expiry, 15 the run the number
  -- is of (0 or none: any). A node that has not heard yet that Redis lost
  -- its data takes a ticket of the lost run for one of this run: its
  -- number is somebody else's here.
  local n = tonumber(ARGV[12])
  local run = tonumber(ARGV[15] or '0') or 0
  expire()
  if run > 0 and run ~= tonumber(gen) then
    result = 5
  elseif n > serving then
    result, detail = 2, n - serving
  elseif n <= floor then
    result = 3
  elseif redis.call('ZSCORE', claimed, n) then
    result = 4
  else
    redis.call('ZADD', claimed, n, n)
    local list = redis.call('LRANGE', batches, 0, -1)
    for i, b in ipairs(list) do
      local at, f, t, c = parse(b)
      if f <= n and n <= t then
        redis.call('LSET', batches, i - 1, fmt(at, f, t, c + 1))
        break
      end
    end
    admitted = admitted + 1
    redis.call('ZADD', sess, tonumber(ARGV[14]), ARGV[13])
    result = 1
  end
elseif op == 'tick' then
  maybe_open()
  mend_step_back()
  refill()
  expire()
  redis.call('ZREMRANGEBYSCORE', ended, '-inf', now)
  -- Lapsed sessions go at every tick, as the memory store's do: not only
  -- when max_active asks how many live (a room without one would keep
  -- every session it ever admitted, in a Redis that must not evict).
  redis.call('ZREMRANGEBYSCORE', sess, '-inf', now)
  -- Never back: a node whose time is behind (half a call's round trip
  -- from the measure, or not measured yet) must not open a gap for the
  -- others.
  ticked = math.max(ticked, now)
  local admits = (mode == 'queue' or mode == 'queue_all') and opened == '1'
  local line = admits and queue > serving
  local slots, tokens_now = free(), budget()
  local full = max_active >= 0 and slots <= math.min(queue - serving, tokens_now)
  local advanced = 0
  if admits then
    -- People to call, and the numbers that calls: numbers given back
    -- ('void') are nobody's, called past at no cost in rate or slots
    -- (counted as claimed, they hold nothing for the claim window).
    local want = math.min(queue - serving, slots, tokens_now)
    local people, to, given = 0, serving, 0
    while want > 0 and people < want and to < queue do
      local hi = math.min(queue, to + (want - people))
      local found = redis.call('ZRANGEBYSCORE', void, to + 1, hi)
      for _, v in ipairs(found) do redis.call('ZADD', claimed, v, v) end
      given = given + #found
      people = people + (hi - to) - #found
      to = hi
    end
    advanced = to - serving
    if advanced > 0 then
      redis.call('ZREMRANGEBYSCORE', void, '-inf', to)
      redis.call('RPUSH', batches, fmt(now, serving + 1, to, given))
      serving = to
      if per_minute >= 0 then tokens = tokens - people end
      result = people
    end
  end
  local function sample(list, value)
    redis.call('RPUSH', list, string.format('%d:%d', now, value))
    while true do
      local first = redis.call('LINDEX', list, 0)
      if not first then break end
      local t = tonumber(string.match(first, '^(%d+):'))
      if t + 60000 >= now then break end
      redis.call('LPOP', list)
    end
  end
  sample(hist, serving)
  -- The line's pace, measured from when it formed, again from when it
  -- filled the room, and told once the room has turned over or after a
  -- minute (see AdmissionState::record_pace); a ticker whose clock is
  -- well behind the last one's (5 s, STEPPED_BACK_MS) starts it again too.
  local last = redis.call('LINDEX', pace, -1)
  if not line or (last and tonumber(string.match(last, '^(%d+):')) > now + STEPPED_BACK) then
    redis.call('DEL', pace)
    pace_full, pace_settled = '', '0'
  end
  if line then
    local filled = full and pace_full == ''
    if filled then
      redis.call('DEL', pace)
      pace_full = string.format('%d', now)
    end
    local called = 0
    last = redis.call('LINDEX', pace, -1)
    if last then called = tonumber(string.match(last, ':(%d+)$')) end
    if not filled then called = called + advanced end
    sample(pace, called)
    if pace_full ~= '' and (called >= math.max(max_active, 0) or now >= tonumber(pace_full) + 60000) then
      pace_settled = '1'
    end
  end
elseif op == 'end' then
  -- sid, when-to-forget pairs: one release, or those a node could not
  -- send while Redis was away.
  result = 0
  for i = 12, #ARGV, 2 do
    result = result + redis.call('ZREM', sess, ARGV[i])
    redis.call('ZADD', ended, 'GT', tonumber(ARGV[i + 1]), ARGV[i])
  end
elseif op == 'handover' then
  -- Old sid, new sid, the new one's expiry, when to forget the old one:
  -- a session back ahead of the queue under a new id, the old one ended
  -- in the same step; 1. Asked again (the same return through another
  -- node, or retried), 2 while the new one lives, renewed. 0: the old one
  -- was ended otherwise (by the portal), or the new one is gone since.
  redis.call('ZREMRANGEBYSCORE', ended, '-inf', now)
  if not redis.call('ZSCORE', ended, ARGV[12]) then
    redis.call('ZREM', sess, ARGV[12])
    redis.call('ZADD', ended, 'GT', tonumber(ARGV[15]), ARGV[12])
    redis.call('ZADD', sess, 'GT', tonumber(ARGV[14]), ARGV[13])
    result = 1
  else
    local exp = redis.call('ZSCORE', sess, ARGV[13])
    if exp and tonumber(exp) > now then
      redis.call('ZADD', sess, 'GT', tonumber(ARGV[14]), ARGV[13])
      result = 2
    end
  end
elseif op == 'peek' then
  local exp = redis.call('ZSCORE', sess, ARGV[12])
  if exp and tonumber(exp) > now then result = 1 end
elseif op == 'check' then
  local exp = redis.call('ZSCORE', sess, ARGV[12])
  if exp and tonumber(exp) > now then
    -- Only raised, as every renewal: another node may have reported a
    -- longer life (a session used through an outage).
    redis.call('ZADD', sess, 'GT', tonumber(ARGV[13]), ARGV[12])
    result = 1
  elseif redis.call('ZSCORE', ended, ARGV[12]) then
    -- Ended by the portal: the asking node must not take it back.
    result = 2
  end
elseif op == 'touch' then
  -- Batched activity from one node: sid, expiry pairs; only raise expiries.
  -- A session the portal ended (through another node) is named back, so
  -- the node stops letting its pass in.
  -- A session Redis let lapse while the node could not report it (the
  -- node cut off from Redis) is added back: the node saw it used, and it
  -- counts against max_active again.
  for i = 12, #ARGV, 2 do
    if redis.call('ZSCORE', ended, ARGV[i]) then
      table.insert(gone, ARGV[i])
    else
      redis.call('ZADD', sess, 'GT', tonumber(ARGV[i + 1]), ARGV[i])
    end
  end
elseif op == 'adopt' then
  -- Sessions a node admitted on its own while Redis was away, unless the
  -- portal has ended them since (through another node, which took the
  -- pass at its word).
  for i = 12, #ARGV, 2 do
    if not redis.call('ZSCORE', ended, ARGV[i]) then
      redis.call('ZADD', sess, 'GT', tonumber(ARGV[i + 1]), ARGV[i])
    end
  end
elseif op == 'reserve' then
  -- Tickets a node handed out while Redis was away, in their order: they
  -- take the next block of numbers, at the back of the line.
  -- Before the opening the first places are the pre-queue's, drawn at
  -- the opening: the block waits for it (-1), and then goes behind them.
  local count = tonumber(ARGV[13])
  local base = redis.call('HGET', prov, ARGV[12])
  if not base then
    maybe_open()
    if opened == '1' then
      base = queue
      queue = queue + count
      redis.call('HSET', prov, ARGV[12], string.format('%d', base))
      -- Sent by a varco that knows it; a block without it is kept.
      if ARGV[14] then redis.call('HSET', prov, '~' .. ARGV[12], ARGV[14]) end
    end
  end
  result = base and tonumber(base) or -1
elseif op == 'void' then
  -- Issues whose answers never reached the node that asked (Redis slower
  -- than its timeout), which gave a provisional ticket instead: their
  -- numbers are nobody's. Not called yet, each waits in the void set for
  -- the tick that calls it; called, it counts as claimed in its batch
  -- now. Either way it holds no slot for the claim window. Counted: how
  -- many were found (an issue that never ran, or of another run, is not).
  for k = 10, #KEYS do
    local v = redis.call('GET', KEYS[k])
    if v then
      redis.call('DEL', KEYS[k])
      local g, n = string.match(v, '^(%d+):(%d+)$')
      n = tonumber(n)
      if g == gen and n and n > floor and not redis.call('ZSCORE', claimed, n) then
        if n > serving then
          redis.call('ZADD', void, n, n)
          result = result + 1
        else
          for i, b in ipairs(redis.call('LRANGE', batches, 0, -1)) do
            local at, f, t, c = parse(b)
            if f <= n and n <= t then
              redis.call('LSET', batches, i - 1, fmt(at, f, t, c + 1))
              redis.call('ZADD', claimed, n, n)
              result = result + 1
              break
            end
          end
        end
      end
    end
  end
elseif op == 'lottery' then
  redis.call('HSETNX', st, 'lkid', ARGV[12])
end

-- A node's tick: its touch went first, so its sessions are reported.
if (op == 'tick' or op == 'view' or op == 'touch' or op == 'adopt') and now > seen then
  seen = now
end

redis.call('HSET', st,
  'queue', string.format('%d', queue), 'serving', string.format('%d', serving),
  'prequeue', string.format('%d', prequeue),
  'tokens', string.format('%.6f', tokens), 'refilled', string.format('%d', refilled),
  'floor', string.format('%d', floor), 'admitted', string.format('%d', admitted),
  'abandoned', string.format('%d', abandoned), 'gen', gen,
  'ticked', string.format('%d', ticked), 'seen', string.format('%d', seen),
  'pfull', pace_full, 'psettled', pace_settled, 'hold', string.format('%d', hold),
  'stepped', string.format('%d', stepped))
if opened_known then redis.call('HSET', st, 'opened', opened) end

local function per_second_milli(list)
  local first, last = redis.call('LINDEX', list, 0), redis.call('LINDEX', list, -1)
  if not (first and last) then return 0 end
  local t0, v0 = string.match(first, '^(%d+):(%d+)$')
  local t1, v1 = string.match(last, '^(%d+):(%d+)$')
  if tonumber(t1) <= tonumber(t0) then return 0 end
  return math.floor((tonumber(v1) - tonumber(v0)) * 1000000 / (tonumber(t1) - tonumber(t0)))
end
local rate, pace_milli = per_second_milli(hist), 0
if pace_full == '' or pace_settled == '1' then pace_milli = per_second_milli(pace) end
local extras = {redis.call('HGET', st, 'lkid') or '', gen, string.format('%d', floor),
  string.format('%d', pace_milli), tostring(#gone)}
for _, v in ipairs(gone) do table.insert(extras, v) end
if op == 'tick' or op == 'view' or op == 'reserve' then
  local blocks = redis.call('HGETALL', prov)
  local forgotten = {}
  if op == 'tick' then
    for i = 1, #blocks, 2 do
      local field = blocks[i]
      if string.sub(field, 1, 1) == '~' and tonumber(blocks[i + 1]) < now then
        local epoch = string.sub(field, 2)
        redis.call('HDEL', prov, field, epoch)
        forgotten[epoch] = true
      end
    end
  end
  for i = 1, #blocks, 2 do
    local field = blocks[i]
    if string.sub(field, 1, 1) ~= '~' and not forgotten[field] then
      table.insert(extras, field)
      table.insert(extras, blocks[i + 1])
    end
  end
end
local live = redis.call('ZCOUNT', sess, '(' .. string.format('%d', now), '+inf')
-- Not known yet: "not opened" (nodes' views keep an opening once seen).
local opened_reply = 0
if opened_known then opened_reply = tonumber(opened) end
return {result, detail, queue, serving, prequeue, opened_reply, live, reserved(), rate,
  admitted, abandoned, extras}
