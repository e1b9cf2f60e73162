--[[
slurm-quota: the logic of the job_submit plugin (JobSubmitPlugins=lua).

At submission: computes what a job asks for (CPU minutes, GPU minutes weighted by GPU type,
times the array element count), checks it against what the user and the account have left
(quota - consumed - preallocated by open jobs), refuses with a message when it does not fit,
otherwise writes a preallocation row keyed by a fresh UUID and appends the tag
"slurm-quota:<uuid>" to the job's admin_comment.
At modification: merges the update over the existing job, re-checks increases made by users,
and keeps the preallocation in step with the job.

Runs inside slurmctld while it holds its locks: no sleep, no fork, one short write
transaction with a bounded wait (busy_timeout), every entry point under pcall, and an explicit
policy (FAIL_OPEN) for a missing, locked or unknown database. Lua 5.1 to 5.4 and LuaJIT.

Layout: 0 configuration, 1 pure functions (no slurm.*, no DB), 2 boundary (Slurm records ->
plain tables; NO_VAL and INFINITE end here), 3 orchestration (injected env), 4 wiring (LuaDBI,
failure policy, entry points). Documentation: docs/plugin.md.

A module: `require("slurm_quota")` returns its table and sets no globals. lua/job_submit.lua
wires Slurm's two entry points to it; a site with its own job_submit.lua calls
M.job_submit(...) and M.job_modify(...) from its entry points instead (docs/plugin.md).
--]]

----------------------------------------------------------------------------------------------
-- 0. configuration
----------------------------------------------------------------------------------------------

-- What to do when the ledger cannot be consulted (missing, locked past BUSY_TIMEOUT_MS,
-- unknown schema) or the plugin itself fails: true = accept the job without a reservation
-- and log an error line; false = refuse it with a message asking to retry.
local FAIL_OPEN = true
local DEFAULT_DB_PATH = "/var/lib/state/slurm-quota/slurm-quota.db"
local DB_PATH_ENV = "SLURM_QUOTA_DB"
-- The configuration file the CLI reads too (slurm_quota/config.py, same rules): absent = a
-- SQLite ledger as above; LedgerType=mariadb = the Storage* keys name a MariaDB database.
local DEFAULT_CONF_PATH = "/etc/slurm-quota/slurm-quota.conf"
local CONF_ENV = "SLURM_QUOTA_CONF"
-- MariaDB: LuaDBI's MySQL driver calls mysql_real_connect() with no option set, so
-- libmariadb waits without limit for a connection, a greeting or a reply (docs/design.md,
-- "MariaDB ledger: bounded stall"). Around it, with luaposix: a non-blocking probe that must
-- see the server's greeting within PROBE_MS before each connect; a cached connection idle for
-- IDLE_REOPEN_S or more is reopened (so probed) rather than reused; TCP_USER_TIMEOUT on the
-- connection's socket (a query whose packets are not acknowledged fails at the kernel's
-- retransmission timer after TCP_USER_TIMEOUT_MS: ~0.47 s measured on loopback); a
-- server-side limit on every statement (row-lock waits included); and a circuit breaker:
-- after the server could not be reached, the next calls within RETRY_S are decided at once by
-- the failure policy, without touching the network.
local PROBE_MS = 100
local IDLE_REOPEN_S = 1
local TCP_USER_TIMEOUT_MS = 50
local STATEMENT_TIMEOUT_S = 0.15
local RETRY_S = 5
-- The only schema this plugin knows (after migrations 0001..0007: PRAGMA user_version on
-- SQLite, schema_version on MariaDB).
local SCHEMA_VERSION = 7
-- Longest wait for the write lock; slurmctld is stalled meanwhile (budget: 250 ms).
local BUSY_TIMEOUT_MS = 200
-- Uids treated as administrators in job_modify besides 0 and SlurmUser (the uid slurmctld
-- runs as), e.g. Slurm operators who may raise time limits.
local ADMIN_UIDS = {}
-- Keep one connection open across calls. Closing the last connection of a WAL database
-- checkpoints and deletes the -wal file, which cost ~5-10 ms (fsync + unlink) per submission
-- when measured; a cached connection avoids it. It keeps its prepared statements too. It is
-- re-validated on every call (schema version; with luaposix, same device/inode via stat) and
-- reopened, with fresh statements, every REOPEN_S seconds and after any error.
local CACHE_CONNECTION = true
local REOPEN_S = 60
local LOG_PREFIX = "slurm-quota: "
local TOKEN_TAG = "slurm-quota:"
-- Per-element amounts are clamped here so that they stay exact integers in every Lua and in
-- SQLite (2^53 > 1e15); no real quota comes near it.
local MAX_MINUTES = 1e15
-- Slurm's hard limit: MaxArraySize <= 4000001, so an array index is at most 4000000.
local MAX_ARRAY_INDEX = 4000000
-- Overlapping array ranges with a step are de-duplicated exactly up to this many elements;
-- above it their counts are added (an over-reservation, never an under-reservation).
local ARRAY_DEDUP_LIMIT = 20000
-- Longest --array specification read at all: the parse must stay far inside the 250 ms
-- budget of a decision whatever it is given (a 3.6 MB one took 2.2 s). 65536 characters hold
-- over 9,000 explicit indices of 7 digits; beyond it a job is refused with a message.
-- (bench/plugin_fuzz.py measures the worst decision over specifications up to several MB.)
local MAX_ARRAY_SPEC_LEN = 65536
-- Most comma-separated items (indices or ranges) read: their sort is what costs (32,768
-- items "0,0,0,..." took 86 ms under lua5.1 on the 2-core VM; 10,000 take about a third).
local MAX_ARRAY_ITEMS = 10000
-- Longest TRES/GRES string (one field) and partition list read at all, for the same reason.
local MAX_FIELD_LEN = 4096

-- Slurm's "unset" and "unlimited" markers (slurm.h, identical in 22.05 to 24.x).
local NO_VAL = 4294967294
local INFINITE = 4294967295
local NO_VAL16 = 65534

-- Return codes, as slurmctld defines them (the slurm table provides the same values).
local RC_SUCCESS = 0
local RC_ERROR = -1
local RC_ACCOUNTING_POLICY = 2050
local RC_MISSING_TIME_LIMIT = 8000

local M = {}
M.VERSION = "1"
M.SCHEMA_VERSION = SCHEMA_VERSION
M.config = {
    fail_open = FAIL_OPEN,
    db_path = nil, -- nil: os.getenv(DB_PATH_ENV) or DEFAULT_DB_PATH, read on every call
    conf_path = nil, -- nil: os.getenv(CONF_ENV) or DEFAULT_CONF_PATH, read on every call
    retry_s = RETRY_S,
    busy_timeout_ms = BUSY_TIMEOUT_MS,
    admin_uids = ADMIN_UIDS,
    cache_connection = CACHE_CONNECTION,
    log_accepts = true,
    -- slurm.conf, for its ClusterName (written into each preallocation): job_submit.lua sets
    -- the one beside it; nil: $SLURM_CONF, else /etc/slurm/slurm.conf.
    slurm_conf = nil,
}

local unpack = table.unpack or unpack -- luacheck: ignore 143
local floor, ceil = math.floor, math.ceil
local toint = math.tointeger or function(x) return x end -- luacheck: ignore 143

----------------------------------------------------------------------------------------------
-- 1. pure functions: no slurm.*, no DB
----------------------------------------------------------------------------------------------

-- Every number that may grow large is computed as a float: Lua 5.3+ integers wrap around.
local function float(x)
    return x * 1.0
end

local function clamp_minutes(x)
    if x ~= x or x <= 0 then return 0 end
    if x > MAX_MINUTES then return MAX_MINUTES end
    return x
end

-- Round a reservation up, ignoring float noise (3 x 0.1 x 10 must give 3, not 4).
local function ceil_minutes(x)
    return clamp_minutes(ceil(x - 1e-7))
end

-- A number as an integer string (no %d: it errors on floats in 5.3+ and on huge values).
local function int_str(x)
    if x == nil then return "?" end
    return string.format("%.0f", x)
end

local function num_str(x)
    if x == floor(x) and x < 1e15 and x > -1e15 then return string.format("%.0f", x) end
    local s = string.format("%.3f", x):gsub("0+$", ""):gsub("%.$", "")
    return s
end

-- A long user-given text shortened for a message (the whole of it may be megabytes), cut
-- before a UTF-8 continuation byte so that the message stays valid text.
local function short(s)
    if #s <= 40 then return s end
    local n = 40
    while n > 1 and s:byte(n + 1) >= 128 and s:byte(n + 1) < 192 do n = n - 1 end
    return s:sub(1, n) .. "... (" .. #s .. " bytes)"
end

local function plural(n, one, many)
    if n == 1 then return int_str(n) .. " " .. one end
    return int_str(n) .. " " .. (many or (one .. "s"))
end

local function trim(s)
    return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

-- Iterate "a,b,c" including empty items (",," gives "").
local function split_commas(s)
    return (s .. ","):gmatch("([^,]*),")
end

--- Number of array elements in a Slurm array spec ("0-9", "1,3,5-7", "0-15:4%2"), or nil
--- and a message. nil/"" spec = not an array = 1. The %throttle does not change the count.
function M.parse_array_inx(spec)
    if spec == nil or spec == "" then return 1 end
    if type(spec) ~= "string" then return nil, "the array specification is not text" end
    if #spec > MAX_ARRAY_SPEC_LEN then
        return nil, string.format("--array=%s is longer than %s characters, the most this "
            .. "plugin reads: use ranges (A-B, A-B:S) instead of long lists", short(spec),
            int_str(MAX_ARRAY_SPEC_LEN))
    end
    local shown = short(spec)
    local body = spec
    local pct = body:find("%", 1, true)
    if pct then
        local throttle = body:sub(pct + 1)
        if not throttle:match("^%d+$") then
            return nil, string.format("the throttle after %% in --array=%s is not a number", shown)
        end
        body = body:sub(1, pct - 1)
    end
    local inner = body:match("^%[(.*)%]$")
    if inner then body = inner end
    if body == "" then return nil, string.format("--array=%s lists no index", shown) end
    local ranges, total, all_step1 = {}, 0, true
    for item in split_commas(body) do
        if #ranges >= MAX_ARRAY_ITEMS then
            return nil, string.format("--array=%s lists more than %s indices or ranges, the "
                .. "most this plugin reads: use ranges (A-B, A-B:S) instead of long lists",
                shown, int_str(MAX_ARRAY_ITEMS))
        end
        local a, b, step = item:match("^(%d+)%-(%d+):(%d+)$")
        if not a then
            a, b = item:match("^(%d+)%-(%d+)$")
            step = "1"
        end
        if not a then
            a = item:match("^(%d+)$")
            b, step = a, "1"
        end
        if not a then
            return nil, string.format("cannot read %q in --array=%s (expected N, A-B or A-B:S, "
                .. "comma separated, with an optional %%T throttle)", short(item), shown)
        end
        if #a > 9 or #b > 9 or #step > 9 then
            return nil, string.format("an index in --array=%s is larger than %s, the most "
                .. "Slurm allows", shown, int_str(MAX_ARRAY_INDEX))
        end
        local lo, hi, st = tonumber(a), tonumber(b), tonumber(step)
        if hi > MAX_ARRAY_INDEX or lo > MAX_ARRAY_INDEX then
            return nil, string.format("an index in --array=%s is larger than %s, the most "
                .. "Slurm allows", shown, int_str(MAX_ARRAY_INDEX))
        end
        if hi < lo then
            return nil, string.format("the range %s in --array=%s ends before it starts", item, shown)
        end
        if st < 1 then
            return nil, string.format("the step of %s in --array=%s must be at least 1", item, shown)
        end
        if st ~= 1 then all_step1 = false end
        ranges[#ranges + 1] = { lo, hi, st }
        total = total + floor((hi - lo) / st) + 1
    end
    if #ranges == 1 then return total end
    if all_step1 then
        -- exact union of intervals
        table.sort(ranges, function(x, y) return x[1] < y[1] end)
        local n, cur_lo, cur_hi = 0, ranges[1][1], ranges[1][2]
        for i = 2, #ranges do
            local r = ranges[i]
            if r[1] <= cur_hi + 1 then
                if r[2] > cur_hi then cur_hi = r[2] end
            else
                n = n + cur_hi - cur_lo + 1
                cur_lo, cur_hi = r[1], r[2]
            end
        end
        return n + cur_hi - cur_lo + 1
    end
    if total <= ARRAY_DEDUP_LIMIT then
        local seen, n = {}, 0
        for _, r in ipairs(ranges) do
            for i = r[1], r[2], r[3] do
                if not seen[i] then
                    seen[i] = true
                    n = n + 1
                end
            end
        end
        return n
    end
    return total
end

local COUNT_SUFFIX = { [""] = 1, k = 1024, m = 1024 ^ 2, g = 1024 ^ 3, t = 1024 ^ 4, p = 1024 ^ 5 }

local function parse_count(text)
    local digits, suffix = text:match("^(%d+)([kKmMgGtTpP]?)$")
    if not digits or #digits > 15 then return nil end
    return float(tonumber(digits)) * COUNT_SUFFIX[suffix:lower()]
end

-- Written like a number but not a count parse_count reads (too many digits, a sign, a
-- fraction, an exponent, hex): in gpu:X such an X is a bad count, never a GPU type. (Types
-- may start with a digit, e.g. MIG's 1g.5gb, so "starts with a digit" is not the test.)
local NUMBER_LIKE = {
    "^[%+%-]?%d+[kKmMgGtTpP]?$",
    "^[%+%-]?%d*%.?%d+[eE][%+%-]?%d+$",
    "^[%+%-]?%d+%.%d*$",
    "^[%+%-]?%.%d+$",
    "^[%+%-]?0[xX]%x*$",
}
local function number_like(text)
    for _, pat in ipairs(NUMBER_LIKE) do
        if text:match(pat) then return true end
    end
    return false
end

--- GPUs named in one TRES/GRES string, as a list of {type = name or false, count = n}.
--- Accepts every spelling Slurm used: gres:gpu:h100:2, gres:gpu:2 (22.05), gres/gpu:h100:2,
--- gres/gpu:2, gres/gpu=2, gres/gpu:h100=2 (later), bare gpu:2, comma lists. Other GRES and
--- TRES (shard, mps, licenses, ...) are ignored. Returns nil and a message when a GPU entry
--- cannot be read.
function M.parse_gpus(text)
    local out = {}
    if text == nil or text == "" then return out end
    if type(text) ~= "string" then return nil, "the GPU request is not text" end
    if #text > MAX_FIELD_LEN then
        return nil, string.format("cannot read the GPU request %s: longer than %s characters",
            short(text), int_str(MAX_FIELD_LEN))
    end
    for raw in split_commas(text) do
        local entry = trim(raw)
        if entry ~= "" then
            local rest = entry:gsub("^gres[:/]", "", 1)
            local name, tail = rest:match("^([^:=]+)(.*)$")
            if name == "gpu" then
                local gpu_type, count_text
                if tail == "" then
                    count_text = "1"
                elseif tail:sub(1, 1) == "=" then
                    count_text = tail:sub(2)
                else
                    local t = tail:sub(2)
                    local a, b = t:match("^([^:=]*)[:=](.*)$")
                    if a then
                        gpu_type, count_text = a, b
                    elseif parse_count(t) then
                        count_text = t
                    elseif number_like(t) then
                        return nil, string.format("cannot read the GPU request %q: %s is not "
                            .. "a GPU count (a whole number of at most 15 digits, e.g. "
                            .. "gpu:2 or gpu:h100:2)", short(entry), short(t))
                    else
                        gpu_type, count_text = t, "1"
                    end
                end
                local count = parse_count(count_text or "")
                if not count or gpu_type == "" then
                    return nil, string.format("cannot read the GPU request %q", short(entry))
                end
                out[#out + 1] = { type = gpu_type or false, count = count }
            end
        end
    end
    return out
end

local function factor_of(gpu_type, factors)
    local f = (gpu_type and factors[gpu_type]) or factors["default"] or 1.0
    if f ~= f or f < 0 then return 0 end
    return f
end

--- Add the GPUs of items (times mult) into acc, a map type-or-"" -> count.
local function add_gpus(acc, items, mult)
    for _, g in ipairs(items) do
        local key = g.type or ""
        acc[key] = (acc[key] or 0) + g.count * mult
    end
end

--- acc (type -> count) as a sorted list of {type, count, factor} and the weight
--- sum(count x factor).
local function gpu_list(acc, factors)
    local list, weight = {}, 0
    for key, count in pairs(acc) do
        if count > 0 then
            local t = key ~= "" and key or false
            local f = factor_of(t, factors)
            list[#list + 1] = { type = t, count = count, factor = f }
            weight = weight + count * f
        end
    end
    table.sort(list, function(x, y) return (x.type or "") < (y.type or "") end)
    return list, weight
end

--- Minutes to reserve per element, and where they came from.
--- t: {minutes = n} (a finite --time), {unset = true} (no --time) or {infinite = true};
--- parts: candidate partitions {name, default_time, max_time} (nil fields = unlimited);
--- fallback: the default_time_minutes setting or nil. Several partitions: the largest.
--- Returns nil, "unbounded" when no finite time can be found.
function M.resolve_time(t, parts, fallback)
    if t.minutes then return t.minutes, "--time" end
    local best, best_src, unbounded = nil, nil, #parts == 0
    for _, p in ipairs(parts) do
        local m, src
        if t.unset and p.default_time then
            m, src = p.default_time, "DefaultTime of partition " .. p.name
        elseif p.max_time then
            m, src = p.max_time, "MaxTime of partition " .. p.name
        end
        if m == nil then
            unbounded = true
        elseif best == nil or m > best then
            best, best_src = m, src
        end
    end
    if not unbounded then return best, best_src end
    if fallback then
        if best and best > fallback then return best, best_src end
        return fallback, "default_time_minutes setting"
    end
    return nil, "unbounded"
end

--- CPUs of one element: the largest of min_cpus, tasks x cpus-per-task,
--- nodes x tasks-per-node x cpus-per-task and nodes x min-cpus-per-node (each only where
--- set); --exclusive takes whole nodes of node_cpus CPUs. Returns cpus, nodes, tasks, note.
function M.resolve_cpus(f)
    local cpt = f.cpus_per_task or 1
    local cpus, note = 1, nil
    local function take(v, why)
        if v and v > cpus then cpus, note = v, why end
    end
    take(f.min_cpus, nil)
    if f.num_tasks or f.cpus_per_task then
        take(float(f.num_tasks or 1) * cpt, nil)
    end
    -- nodes x tasks-per-node counts only without -n: with -n it is a maximum per node, and
    -- since 23.11.2 `-n 5 --ntasks-per-node=4` arrives with min_nodes = 2 for 5 tasks.
    if f.min_nodes and f.ntasks_per_node and not f.num_tasks then
        take(float(f.min_nodes) * f.ntasks_per_node * cpt, nil)
    end
    if f.pn_min_cpus then take(float(f.min_nodes or 1) * f.pn_min_cpus, nil) end
    local nodes = f.min_nodes or 1
    local tasks = f.num_tasks
    if not tasks and f.min_nodes and f.ntasks_per_node then tasks = f.min_nodes * f.ntasks_per_node end
    tasks = tasks or 1
    if f.exclusive and f.node_cpus and f.node_cpus >= 1 then
        local need = ceil(cpus / f.node_cpus)
        if need > nodes then nodes = need end
        cpus = float(nodes) * f.node_cpus
        note = string.format("--exclusive: %s of %s CPUs", plural(nodes, "whole node"), int_str(f.node_cpus))
    end
    return cpus, nodes, tasks, note
end

--- GPUs of one element from the four TRES fields: per job x1, per node x nodes, per task x
--- tasks, per socket x nodes x sockets; --exclusive takes the whole node's GPUs (node_gpus,
--- a list like parse_gpus gives) when that is more. Returns list {type, count, factor},
--- weight (sum count x factor), or nil and a message.
function M.resolve_gpus(tres, shape, factors, node_gpus)
    local acc = {}
    local fields = {
        { tres.per_job, 1, "tres_per_job" },
        { tres.per_node, shape.nodes, "tres_per_node" },
        { tres.per_task, shape.tasks, "tres_per_task" },
        { tres.per_socket, float(shape.nodes) * (shape.sockets_per_node or 1), "tres_per_socket" },
    }
    for _, fld in ipairs(fields) do
        local items, err = M.parse_gpus(fld[1])
        if not items then return nil, err .. " (" .. fld[3] .. ")" end
        add_gpus(acc, items, fld[2])
    end
    local list, weight = gpu_list(acc, factors)
    if shape.exclusive and node_gpus and #node_gpus > 0 then
        local whole = {}
        add_gpus(whole, node_gpus, shape.nodes)
        local wlist, wweight = gpu_list(whole, factors)
        if wweight > weight then return wlist, wweight, true end
    end
    return list, weight, false
end

--- The full request of one element and of the whole submission, or nil and a refusal.
--- view: the plain table the boundary builds; settings: parsed settings; factors: type ->
--- factor. The time may stay nil (unbounded): decide() turns that into a refusal when a
--- quota applies.
function M.build_request(view, settings, factors)
    local array_count, aerr = M.parse_array_inx(view.array_inx)
    if not array_count then return nil, { kind = "malformed", message = aerr } end
    local parts = view.partitions
    local node_cpus, node_gpus = nil, nil
    for _, p in ipairs(parts) do
        if p.total_cpus and p.total_nodes and p.total_nodes >= 1 then
            local c = ceil(p.total_cpus / p.total_nodes)
            if not node_cpus or c > node_cpus then node_cpus = c end
        end
    end
    if view.exclusive then
        local best_w = -1
        for _, p in ipairs(parts) do
            local spec = settings["node_gpus." .. p.name] or settings["node_gpus"]
            local items = spec and M.parse_gpus(spec)
            if items then
                local _, w = gpu_list((function() local a = {}; add_gpus(a, items, 1); return a end)(), factors)
                if w > best_w then node_gpus, best_w = items, w end
            end
        end
        if #parts == 0 and settings["node_gpus"] then node_gpus = M.parse_gpus(settings["node_gpus"]) end
    end
    local cpus, nodes, tasks, cpu_note = M.resolve_cpus({
        min_cpus = view.min_cpus, num_tasks = view.num_tasks, cpus_per_task = view.cpus_per_task,
        min_nodes = view.min_nodes, ntasks_per_node = view.ntasks_per_node,
        pn_min_cpus = view.pn_min_cpus, exclusive = view.exclusive, node_cpus = node_cpus,
    })
    local gpus, weight, gerr = M.resolve_gpus(view.tres, {
        nodes = nodes, tasks = tasks, sockets_per_node = view.sockets_per_node,
        exclusive = view.exclusive,
    }, factors, node_gpus)
    if not gpus then return nil, { kind = "malformed", message = weight } end
    -- --cpus-per-gpu (cpus_per_tres "gres:gpu:2"): the job gets at least GPUs x that many CPUs
    local cpg_items = M.parse_gpus(view.cpus_per_tres)
    if cpg_items and #cpg_items > 0 then
        local per_gpu, gpu_count = 0, 0
        for _, c in ipairs(cpg_items) do
            if c.count > per_gpu then per_gpu = c.count end
        end
        for _, g in ipairs(gpus) do gpu_count = gpu_count + g.count end
        if gpu_count * per_gpu > cpus then
            cpus, cpu_note = float(gpu_count) * per_gpu, "--cpus-per-gpu"
        end
    end
    local time, time_source = M.resolve_time(view.time, parts, settings.default_time_minutes)
    local r = {
        cpus = cpus, nodes = nodes, tasks = tasks, cpu_note = cpu_note,
        gpus = gpus, gpu_weight = weight, gpu_whole_node = gerr == true,
        time = time, time_source = time_source, time_unset = view.time.unset or false,
        array_count = array_count,
    }
    M.set_amounts(r, time)
    return r
end

--- Per-element and total minutes of request r for a time (nil = unbounded: 0 reserved).
function M.set_amounts(r, time)
    r.time = time
    local t = time or 0
    r.cpu_minutes = ceil_minutes(float(r.cpus) * t)
    r.gpu_minutes = ceil_minutes(float(r.gpu_weight) * t)
    r.cpu_total = r.cpu_minutes * r.array_count
    r.gpu_total = r.gpu_minutes * r.array_count
    return r
end

--- Will slurmctld let a non-administrator raise this job's time limit to t? (22.05: only
--- while the job is pending, and only up to the partition's MaxTime; UNLIMITED only where
--- there is no MaxTime.) When unsure (no partition known), no: the row must never grow on an
--- update that slurmctld then denies.
function M.user_may_raise_time(pending, t, new_minutes, parts)
    if not pending or #parts == 0 then return false end
    for _, p in ipairs(parts) do
        if p.max_time then
            if t.infinite or (new_minutes and new_minutes > p.max_time) then return false end
        end
    end
    return true
end

local RESOURCES = {
    cpu = { label = "CPU", unit = "CPU-minutes" },
    gpu = { label = "GPU", unit = "GPU-minutes" },
}

-- The quota checks, in order; the first failure wins.
M.CHECKS = {
    { owner = "user", resource = "cpu" },
    { owner = "user", resource = "gpu" },
    { owner = "account", resource = "cpu" },
    { owner = "account", resource = "gpu" },
}

--- Consumed minutes of an exact total (CPU-seconds: per_minute 60; GPU-ms: 60000) by the
--- one rule of slurm_quota.ledger.minutes_from_exact: ceil(exact / per_minute). Requests are
--- whole minutes, so requested <= quota - ceil(consumed_s / 60) - reserved is the comparison
--- in seconds (requested*60 <= quota*60 - consumed_s - reserved*60) without products that
--- leave the exact range of a double. fmod and the division of a multiple are exact.
function M.minutes_from_exact(exact, per_minute)
    local rest = math.fmod(exact, per_minute)
    local whole = (exact - rest) / per_minute
    if rest > 0 then whole = whole + 1 end
    return whole
end

--- Minutes left: quota - consumed - reserved, or nil when the quota is unlimited (< 0).
function M.available(quota, consumed, reserved)
    if quota == nil or quota < 0 then return nil end
    return quota - (consumed or 0) - (reserved or 0)
end

--- Does any finite quota apply to what r asks for? (CPU always; GPU only with GPUs.)
function M.quota_applies(r, ledgers)
    for _, c in ipairs(M.CHECKS) do
        local l = ledgers[c.owner]
        local q = l["quota_" .. c.resource]
        if q and q >= 0 and (c.resource == "cpu" or r.gpu_weight > 0) then return true end
    end
    return false
end

--- First failing check of r against the ledgers {user = ledger, account = ledger}, or nil.
--- only: optional set of "owner.resource" to check (job_modify checks only increases).
function M.decide(r, ledgers, only)
    for _, c in ipairs(M.CHECKS) do
        local key = c.owner .. "." .. c.resource
        if not only or only[key] then
            local l = ledgers[c.owner]
            local requested = r[c.resource .. "_total"]
            local avail = M.available(l["quota_" .. c.resource], l["consumed_" .. c.resource],
                l["reserved_" .. c.resource])
            if avail and requested > 0 and requested > avail then
                return {
                    owner = c.owner, resource = c.resource, name = l.name,
                    requested = requested, available = avail,
                    quota = l["quota_" .. c.resource], consumed = l["consumed_" .. c.resource] or 0,
                    reserved = l["reserved_" .. c.resource] or 0, open_jobs = l.open_jobs or 0,
                }
            end
        end
    end
    return nil
end

local function describe_gpus(r)
    local parts = {}
    for _, g in ipairs(r.gpus) do
        parts[#parts + 1] = string.format("%s %s x factor %s",
            plural(g.count, "GPU"), g.type and g.type or "(untyped, default factor)",
            num_str(g.factor))
    end
    local s = table.concat(parts, " + ")
    if #parts > 1 then s = "(" .. s .. ")" end
    if r.gpu_whole_node then s = s .. " [--exclusive: every GPU of the node]" end
    return s
end

local function describe_time(r)
    if r.time_source == "--time" then return int_str(r.time) .. " min" end
    return string.format("%s min (%s, as the job has %s)", int_str(r.time), r.time_source,
        r.time_unset and "no --time" or "--time=UNLIMITED")
end

--- The lines a user reads when the job is refused (each becomes one "sbatch: error:" line).
function M.refusal_lines(r, fail, who)
    local res = RESOURCES[fail.resource]
    local lines = {}
    local owner = fail.owner == "user" and ("user " .. fail.name) or ("account " .. fail.name)
    lines[1] = string.format("%sjob %s refused: it needs more %s than %s has left.",
        LOG_PREFIX, who.job_label, res.unit, owner)
    local breakdown
    if fail.resource == "cpu" then
        breakdown = string.format("%s x %s", plural(r.cpus, "CPU"), describe_time(r))
        if r.cpu_note then breakdown = breakdown .. " [" .. r.cpu_note .. "]" end
    else
        breakdown = string.format("%s x %s", describe_gpus(r), describe_time(r))
        local exact = r.gpu_weight * r.time
        if math.abs(exact - floor(exact + 0.5)) > 1e-6 then breakdown = breakdown .. ", rounded up" end
    end
    if r.array_count > 1 then
        breakdown = breakdown .. string.format(" x %s", plural(r.array_count, "array element"))
    end
    lines[2] = string.format("%s  requested: %s %s = %s", LOG_PREFIX, int_str(fail.requested),
        res.unit, breakdown)
    local parts = string.format("quota %s - consumed %s - reserved %s by %s", int_str(fail.quota),
        int_str(fail.consumed), int_str(fail.reserved), plural(fail.open_jobs, "queued/running job"))
    if fail.available >= 0 then
        lines[3] = string.format("%s  available: %s %s = %s", LOG_PREFIX, int_str(fail.available),
            res.unit, parts)
    else
        lines[3] = string.format("%s  available: 0 %s (%s = %s)", LOG_PREFIX, res.unit, parts,
            int_str(fail.available))
    end
    local hints = {}
    local per_min = (fail.resource == "cpu" and r.cpus or r.gpu_weight) * r.array_count
    if fail.available <= 0 then
        hints[1] = "nothing is left: wait for your queued/running jobs to finish"
    else
        local max_time = per_min > 0 and floor(fail.available / per_min) or 0
        if max_time >= 1 then
            hints[#hints + 1] = string.format("--time=%s or less would fit", int_str(max_time))
        end
        local per_element = fail.requested / r.array_count
        if r.array_count > 1 and per_element > 0 then
            local n = floor(fail.available / per_element)
            if n >= 1 then
                hints[#hints + 1] = string.format("%s would fit", plural(n, "array element"))
            end
        end
        hints[#hints + 1] = string.format("fewer %ss", res.label)
    end
    if fail.owner == "account" then
        hints[#hints + 1] = "another account of yours (-A/--account)"
    end
    hints[#hints + 1] = "ask your administrators for more quota"
    lines[4] = string.format("%s  hint: %s. Usage: slurm-quota stats", LOG_PREFIX,
        table.concat(hints, "; or "))
    return lines
end

--- The lines a user reads when the job has no time limit to reserve against.
function M.missing_time_lines(who)
    return {
        string.format("%sjob %s refused: it has no time limit, and a CPU/GPU-minute quota "
            .. "applies to %s.", LOG_PREFIX, who.job_label, who.owner_label),
        string.format("%s  hint: add --time (for example --time=60 for one hour); the quota "
            .. "reserves CPUs x time until the job ends.", LOG_PREFIX),
    }
end

local UUID_PAT = "%x%x%x%x%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%-%x%x%x%x%x%x%x%x%x%x%x%x"

--- The preallocation UUID in an admin comment: the last "slurm-quota:<uuid>" tag, or the
--- whole comment when it is a bare UUID (the seed system's format). Returns uuid, token.
function M.find_token(admin_comment)
    if type(admin_comment) ~= "string" then return nil end
    local last
    for uuid in admin_comment:gmatch(TOKEN_TAG:gsub("%-", "%%-") .. "(" .. UUID_PAT .. ")") do
        last = uuid
    end
    if last then return last, TOKEN_TAG .. last end
    local bare = trim(admin_comment)
    if bare:match("^" .. UUID_PAT .. "$") then return bare, bare end
    return nil
end

--- admin_comment with token appended (space separated), unless it already carries it.
function M.append_token(admin_comment, token)
    if type(admin_comment) ~= "string" or trim(admin_comment) == "" then return token end
    if admin_comment:find(token, 1, true) then return admin_comment end
    return admin_comment .. " " .. token
end

--- A version 4 UUID from 16 random bytes.
function M.uuid_from_bytes(b)
    local bytes = { b:byte(1, 16) }
    bytes[7] = 64 + bytes[7] % 16
    bytes[9] = 128 + bytes[9] % 64
    return string.format("%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
        unpack(bytes))
end

--- Settings rows {key, value} -> table; numeric knobs parsed, the rest kept as text.
function M.parse_settings(rows)
    local s = {}
    for _, row in ipairs(rows) do
        if type(row[1]) == "string" and row[2] ~= nil then s[row[1]] = tostring(row[2]) end
    end
    -- Whole numbers in ASCII digits only (what `slurm-quota` stores): tonumber() would also
    -- read " 0x10", "1e5" or "inf", which the Python side refuses.
    local function number(key)
        local text = s[key] and trim(s[key])
        local digits = text and text:match("^%-?(%d+)$")
        if digits and #digits <= 15 then s[key] = tonumber(text) else s[key] = nil end
    end
    for _, key in ipairs({ "default_user_quota_cpu_minutes", "default_user_quota_gpu_minutes",
        "default_account_quota_cpu_minutes", "default_account_quota_gpu_minutes",
        "default_time_minutes" }) do
        number(key)
    end
    if s.default_time_minutes and s.default_time_minutes < 0 then s.default_time_minutes = nil end
    return s
end

----------------------------------------------------------------------------------------------
-- 2. boundary: Slurm records -> plain tables. NO_VAL / INFINITE end here.
----------------------------------------------------------------------------------------------

-- A count field (uint32 or uint16): nil when unset, absurd or not a number.
local function count_field(v)
    if type(v) ~= "number" or v ~= v or v < 0 then return nil end
    if v == NO_VAL16 or v == NO_VAL16 + 1 or v >= NO_VAL then return nil end
    return floor(v)
end

local function string_field(v)
    if type(v) == "string" and v ~= "" then return v end
    return nil
end

-- A time field in minutes: {minutes = n}, {unset = true} or {infinite = true}.
local function time_field(v)
    if type(v) ~= "number" or v ~= v or v < 0 or v == NO_VAL or v > INFINITE then
        return { unset = true }
    end
    -- sbatch turns --time=0 into INFINITE; treat a literal 0 the same way (never 0 minutes).
    if v == INFINITE or v == 0 then return { infinite = true } end
    return { minutes = floor(v) }
end

local function part_minutes(v)
    if type(v) ~= "number" or v ~= v or v < 0 or v >= NO_VAL then return nil end
    return floor(v)
end

-- Read fields from a Slurm proxy table; a failing __index reads as nil.
local function index(rec, key)
    return rec[key]
end

local function getter(rec)
    return function(key)
        if rec == nil then return nil end
        local ok, v = pcall(index, rec, key)
        if ok then return v end
        return nil
    end
end

local function read_partition(name, part)
    local get = getter(part)
    local total_cpus, total_nodes = count_field(get("total_cpus")), count_field(get("total_nodes"))
    return {
        name = name,
        default_time = part_minutes(get("default_time")),
        max_time = part_minutes(get("max_time")),
        total_cpus = total_cpus, total_nodes = total_nodes,
    }
end

--- Candidate partitions of a job: the named ones ("a,b") found in part_list, else the
--- default one (flag_default == 1).
function M.read_partitions(partition, part_list)
    local parts = {}
    if type(part_list) ~= "table" then return parts end
    local names = string_field(partition)
    if names then
        for name in split_commas(names) do
            name = trim(name)
            local ok, p = pcall(index, part_list, name)
            if name ~= "" and ok and p ~= nil then parts[#parts + 1] = read_partition(name, p) end
        end
        return parts
    end
    local ok = pcall(function()
        for name, p in pairs(part_list) do
            local fd = getter(p)("flag_default")
            if fd == 1 or fd == true then
                parts[#parts + 1] = read_partition(tostring(name), p)
            end
        end
    end)
    if not ok then return {} end
    table.sort(parts, function(x, y) return x.name < y.name end)
    return parts
end

local function read_tres(get)
    return {
        per_job = get("tres_per_job"),
        per_node = get("tres_per_node") or get("gres"),
        per_task = get("tres_per_task"),
        per_socket = get("tres_per_socket"),
    }
end

--- job_desc (+ part_list) of a submission -> plain view.
function M.read_submit(job_desc, part_list)
    local get = getter(job_desc)
    local shared = count_field(get("shared"))
    local uid = count_field(get("user_id"))
    return {
        user = string_field(get("user_name")),
        uid = uid,
        account = string_field(get("account")) or string_field(get("default_account")),
        job_name = string_field(get("name")),
        partitions = M.read_partitions(get("partition"), part_list),
        time = time_field(get("time_limit")),
        min_cpus = count_field(get("min_cpus")),
        num_tasks = count_field(get("num_tasks")),
        cpus_per_task = count_field(get("cpus_per_task")),
        min_nodes = count_field(get("min_nodes")),
        ntasks_per_node = count_field(get("ntasks_per_node")),
        pn_min_cpus = count_field(get("pn_min_cpus")),
        sockets_per_node = count_field(get("sockets_per_node")),
        exclusive = shared == 0,
        tres = read_tres(get),
        cpus_per_tres = get("cpus_per_tres"),
        array_inx = get("array_inx"),
        het_offset = count_field(get("het_job_offset")),
        admin_comment = get("admin_comment"),
    }
end

-- Fields of an update that change what a job reserves.
local CPU_FIELDS = { "cpus_per_tres", "min_cpus", "num_tasks", "cpus_per_task", "min_nodes", "ntasks_per_node",
    "pn_min_cpus", "shared" }
local GPU_FIELDS = { "cpus_per_tres", "tres_per_job", "tres_per_node", "tres_per_task", "tres_per_socket", "gres",
    "min_nodes", "num_tasks", "sockets_per_node", "shared" }

--- job_desc (the update: only changed fields set) merged over job_rec (the job) -> plain
--- views of the current job and of the job after the update, plus what the update touches.
function M.read_modify(job_desc, job_rec, part_list)
    local d, j = getter(job_desc), getter(job_rec)
    local function changed_any(fields)
        for _, f in ipairs(fields) do
            local v = d(f)
            if type(v) == "string" or count_field(v) ~= nil then return true end
        end
        return false
    end
    local cur_partition = string_field(j("partition"))
    local new_partition = string_field(d("partition")) or cur_partition
    local time_v = d("time_limit")
    local time_changed = type(time_v) == "number" and time_v ~= NO_VAL
    local cur_tres = read_tres(j)
    local new_tres = read_tres(d)
    for k, v in pairs(cur_tres) do
        if new_tres[k] == nil then new_tres[k] = v end
    end
    -- job_rec has no num_tasks/cpus_per_task: tasks are estimated as min_cpus / pn_min_cpus.
    local rec_min_cpus, rec_pn = count_field(j("min_cpus")), count_field(j("pn_min_cpus"))
    local rec_tasks = nil
    if rec_min_cpus and rec_pn and rec_pn >= 1 then rec_tasks = floor(rec_min_cpus / rec_pn) end
    local shared = count_field(d("shared"))
    local cur = {
        partitions = M.read_partitions(cur_partition, part_list),
        time = time_field(j("time_limit")),
        min_cpus = rec_min_cpus, min_nodes = count_field(j("min_nodes")), num_tasks = rec_tasks,
        tres = cur_tres, exclusive = false, cpus_per_tres = j("cpus_per_tres"),
    }
    local new = {
        partitions = M.read_partitions(new_partition, part_list),
        time = time_changed and time_field(time_v) or cur.time,
        min_cpus = count_field(d("min_cpus")) or rec_min_cpus,
        num_tasks = count_field(d("num_tasks")),
        cpus_per_task = count_field(d("cpus_per_task")),
        min_nodes = count_field(d("min_nodes")) or count_field(j("min_nodes")),
        ntasks_per_node = count_field(d("ntasks_per_node")),
        pn_min_cpus = count_field(d("pn_min_cpus")),
        sockets_per_node = count_field(d("sockets_per_node")),
        exclusive = shared == 0,
        tres = new_tres,
        cpus_per_tres = d("cpus_per_tres") or j("cpus_per_tres"),
    }
    if not new.num_tasks and not new.cpus_per_task then new.num_tasks = rec_tasks end
    return {
        user = string_field(d("user_name")),
        uid = count_field(d("user_id")) or count_field(j("user_id")),
        job_id = count_field(j("job_id")),
        -- JOB_PENDING is 0 in the low byte of job_state (the high bits are flags)
        pending = type(j("job_state")) == "number" and j("job_state") % 256 == 0,
        job_name = string_field(j("name")),
        cur_account = string_field(j("account")),
        account = string_field(d("account")) or string_field(j("account")),
        admin_comment_rec = j("admin_comment"),
        admin_comment_new = d("admin_comment"),
        cur = cur,
        new = new,
        time_changed = time_changed,
        partition_changed = string_field(d("partition")) ~= nil,
        account_changed = string_field(d("account")) ~= nil,
        cpu_changed = changed_any(CPU_FIELDS),
        gpu_changed = changed_any(GPU_FIELDS),
    }
end

----------------------------------------------------------------------------------------------
-- 3. orchestration: env = {slurm = <slurm-like table>, db = <session>, now = fn, uuid = fn,
--    is_admin = fn(uid)}. db:query(name, ...) -> rows, db:exec(name, ...); names index SQL.
----------------------------------------------------------------------------------------------

local function cast_real(columns)
    local out = {}
    for i, c in ipairs(columns) do out[i] = "CAST(" .. c .. " AS REAL)" end
    return table.concat(out, ", ")
end
-- consumed_cpu_s / consumed_gpu_ms: the exact totals of migration 0005 (the seed's minute
-- columns are derived from them; reading the exact ones keeps the check exact even if a
-- foreign tool rewrote the minutes).
local real_columns = cast_real({ "quota_cpu_minutes", "consumed_cpu_s",
    "quota_gpu_minutes", "consumed_gpu_ms", "reserved_jobs", "reserved_cpu_minutes",
    "reserved_gpu_minutes" })

local SQL = {
    busy_timeout = "PRAGMA busy_timeout = " .. string.format("%d", BUSY_TIMEOUT_MS),
    foreign_keys = "PRAGMA foreign_keys = ON",
    -- WAL + NORMAL: a commit does not fsync (DESIGN §6: every row can be rebuilt by reconcile);
    -- with the default FULL each accepted submission paid an fsync (measured: ~5 ms here).
    synchronous = "PRAGMA synchronous = NORMAL",
    user_version = "PRAGMA user_version",
    -- Checkpoints never run on slurmctld's path: the Python side (charge, reconcile) runs
    -- them with SQLite's default wal_autocheckpoint (it cost ~10 ms about every 125 calls).
    wal_autocheckpoint = "PRAGMA wal_autocheckpoint = 0",
    begin = "BEGIN IMMEDIATE",
    commit = "COMMIT",
    rollback = "ROLLBACK",
    -- What a decision reads besides the owner rows, in one round trip: settings ('s'), GPU
    -- factors ('g') and the schema version ('v'), so a reused connection's version check
    -- costs no statement of its own.
    context = "SELECT 's', key, value FROM settings "
        .. "UNION ALL SELECT 'g', gpu_type, factor FROM gpu_factors "
        .. "UNION ALL SELECT 'v', '', user_version FROM pragma_user_version",
    -- One row per owner: quota, consumed and the running totals of its open reservations
    -- (reserved_*, kept exact by the triggers of migration 0003 on jobs_preallocations), so
    -- the check costs the same whatever the number of open jobs.
    -- Every number is read as REAL: lua-dbi-sqlite3 up to 0.7.4 (Debian 12 and 13) reads an
    -- INTEGER column with sqlite3_column_int, 32 bits, so a quota of 3,000,000,000 minutes
    -- came back negative (= unlimited). A double is exact up to 2^53.
    user = "SELECT " .. real_columns .. " FROM users WHERE username = ?",
    account = "SELECT " .. real_columns .. " FROM accounts WHERE account = ?",
    insert_user = "INSERT INTO users (username, quota_cpu_minutes, quota_gpu_minutes) "
        .. "VALUES (?, ?, ?) ON CONFLICT (username) DO NOTHING",
    insert_account = "INSERT INTO accounts (account, quota_cpu_minutes, quota_gpu_minutes) "
        .. "VALUES (?, ?, ?) ON CONFLICT (account) DO NOTHING",
    insert_prealloc = "INSERT INTO jobs_preallocations (job_uuid, username, account, "
        .. "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size, created_at, "
        .. "cluster) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
    prealloc = "SELECT username, account, CAST(preallocated_cpu_minutes AS REAL), "
        .. "CAST(preallocated_gpu_minutes AS REAL), CAST(array_size AS REAL) "
        .. "FROM jobs_preallocations WHERE job_uuid = ?",
    update_prealloc = "UPDATE jobs_preallocations SET account = ?, preallocated_cpu_minutes = ?, "
        .. "preallocated_gpu_minutes = ? WHERE job_uuid = ?",
}
M.SQL = SQL

-- The same statements for a MariaDB ledger (migrations/mariadb). Numbers are read as DOUBLE
-- (LuaDBI's MySQL driver reads INT as a C int and BIGINT as a double; a DOUBLE is exact up to
-- 2^53 either way). The owner rows are read FOR UPDATE: the check and the reservation are one
-- step across controllers because a second slurmctld's transaction for the same user or
-- account waits on these row locks (always user, then account) until the first one commits,
-- then reads the totals the first one left (docs/design.md, "MariaDB ledger: one decision
-- at a time per owner"). READ COMMITTED: no gap locks, and a locking read sees the latest
-- committed row.
local function cast_double(columns)
    local out = {}
    for i, c in ipairs(columns) do out[i] = "CAST(" .. c .. " AS DOUBLE)" end
    return table.concat(out, ", ")
end
local double_columns = cast_double({ "quota_cpu_minutes", "consumed_cpu_s",
    "quota_gpu_minutes", "consumed_gpu_ms", "reserved_jobs", "reserved_cpu_minutes",
    "reserved_gpu_minutes" })
local SQL_MARIADB = {
    isolation = "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
    -- Every statement, a wait for a row lock included, ends within this (MariaDB's
    -- max_statement_time, seconds with a fraction); the 1 s lock wait is only a backstop.
    -- Times in UTC, as every connection of the Python side (migrations/mariadb/0001).
    session = "SET SESSION max_statement_time = " .. string.format("%.3f", STATEMENT_TIMEOUT_S)
        .. ", innodb_lock_wait_timeout = 1, time_zone = '+00:00'",
    user_version = "SELECT version FROM schema_version",
    begin = "START TRANSACTION",
    commit = "COMMIT",
    rollback = "ROLLBACK",
    -- As SQL.context; one column type for all three (text), read back with tonumber().
    context = "SELECT 's', `key`, value FROM settings "
        .. "UNION ALL SELECT 'g', gpu_type, CAST(factor AS CHAR) FROM gpu_factors "
        .. "UNION ALL SELECT 'v', '', CAST(version AS CHAR) FROM schema_version",
    user = "SELECT " .. double_columns .. " FROM users WHERE username = ? FOR UPDATE",
    account = "SELECT " .. double_columns .. " FROM accounts WHERE account = ? FOR UPDATE",
    -- Only run when the locking read found no row: a concurrent first submission of the same
    -- new owner makes this wait for that transaction, then the row is read FOR UPDATE again.
    insert_user = "INSERT IGNORE INTO users (username, quota_cpu_minutes, quota_gpu_minutes) "
        .. "VALUES (?, ?, ?)",
    insert_account = "INSERT IGNORE INTO accounts (account, quota_cpu_minutes, "
        .. "quota_gpu_minutes) VALUES (?, ?, ?)",
    insert_prealloc = SQL.insert_prealloc,
    prealloc = "SELECT username, account, CAST(preallocated_cpu_minutes AS DOUBLE), "
        .. "CAST(preallocated_gpu_minutes AS DOUBLE), CAST(array_size AS DOUBLE) "
        .. "FROM jobs_preallocations WHERE job_uuid = ? FOR UPDATE",
    update_prealloc = SQL.update_prealloc,
}
M.SQL_MARIADB = SQL_MARIADB

local function log(env, level, line)
    local fn = env.slurm[level] or env.slurm.log_info
    if fn then fn("%s", line) end
end

local function job_label(view)
    local name = view.job_name and string.format("%q", view.job_name) or "(no name)"
    if view.job_id then name = string.format("%s %s", int_str(view.job_id), name) end
    return name
end

local function job_ident(view)
    return string.format("user=%s uid=%s account=%s job=%s", tostring(view.user),
        int_str(view.uid), tostring(view.account), job_label(view))
end
M.job_ident = job_ident

local function num_or(v, default)
    v = tonumber(v)
    if v == nil or v ~= v then return default end
    return float(v)
end

local function parse_factors(rows)
    local f = {}
    for _, row in ipairs(rows) do
        local v = tonumber(row[2])
        if type(row[1]) == "string" and v then f[row[1]] = float(v) end
    end
    return f
end

-- Read on every call: caching them behind PRAGMA data_version was measured inside slurmctld
-- and the version probe cost as much as the settings query it saved (docs/benchmarks.md).
-- Settings and GPU factors come from one query (SQL.context), which also carries the schema
-- version that Lazy:query checks on a reused connection.
local function load_context(db)
    local settings, factors, n_s, n_g = {}, {}, 0, 0
    for _, row in ipairs(db:query("context")) do
        if row[1] == "s" then
            n_s = n_s + 1
            settings[n_s] = { row[2], row[3] }
        elseif row[1] == "g" then
            n_g = n_g + 1
            factors[n_g] = { row[2], row[3] }
        end
    end
    return M.parse_settings(settings), parse_factors(factors)
end

local function load_ledger(db, owner, name, settings)
    local rows = db:query(owner, name)
    if not rows[1] and db.locks_rows and db:locks_rows() then
        -- MariaDB: a missing owner row cannot be locked, so it is created first (rolled back
        -- with the transaction if the job is refused) and read again under its lock.
        local prefix = "default_" .. owner .. "_quota_"
        db:exec("insert_" .. owner, name, toint(settings[prefix .. "cpu_minutes"] or -1),
            toint(settings[prefix .. "gpu_minutes"] or -1))
        rows = db:query(owner, name)
    end
    local l = { owner = owner, name = name }
    local prefix = "default_" .. owner .. "_quota_"
    local r = rows[1]
    if r then
        l.exists = true
        l.quota_cpu = num_or(r[1], -1)
        l.consumed_cpu = M.minutes_from_exact(num_or(r[2], 0), 60)
        l.quota_gpu = num_or(r[3], -1)
        l.consumed_gpu = M.minutes_from_exact(num_or(r[4], 0), 60000)
        l.open_jobs, l.reserved_cpu, l.reserved_gpu = num_or(r[5], 0), num_or(r[6], 0),
            num_or(r[7], 0)
    else
        -- no row yet: nothing consumed, nothing reserved (the row is created on acceptance)
        l.exists = false
        l.quota_cpu = settings[prefix .. "cpu_minutes"] or -1
        l.quota_gpu = settings[prefix .. "gpu_minutes"] or -1
        l.consumed_cpu, l.consumed_gpu = 0, 0
        l.open_jobs, l.reserved_cpu, l.reserved_gpu = 0, 0, 0
    end
    return l
end

local function ensure_owner(db, l, settings)
    if l.exists then return end
    local prefix = "default_" .. l.owner .. "_quota_"
    db:exec("insert_" .. l.owner, l.name, toint(settings[prefix .. "cpu_minutes"] or -1),
        toint(settings[prefix .. "gpu_minutes"] or -1))
end

local function timestamp(env)
    return os.date("!%Y-%m-%d %H:%M:%S", env.now and env.now() or os.time())
end

local function describe_request(r)
    local g = {}
    for _, x in ipairs(r.gpus) do
        g[#g + 1] = string.format("%s:%s", x.type or "untyped", num_str(x.count))
    end
    return string.format("cpus=%s time=%s gpus=%s array=%s cpu_min=%s gpu_min=%s",
        int_str(r.cpus), r.time and int_str(r.time) or "unbounded",
        #g > 0 and table.concat(g, ",") or "0", int_str(r.array_count),
        int_str(r.cpu_minutes), int_str(r.gpu_minutes))
end

local function refuse(env, view, lines, rc, reason)
    for _, line in ipairs(lines) do env.slurm.log_user("%s", line) end
    log(env, "log_info", string.format("%srefused %s: %s", LOG_PREFIX, job_ident(view), reason))
    return rc
end

--- slurm_job_submit with an injected env; raises on DB errors (the wiring applies the policy).
function M.submit(env, job_desc, part_list, submit_uid)
    local view = M.read_submit(job_desc, part_list)
    if not view.user and view.uid and env.user_name then
        -- slurmctld leaves user_name unset on some paths (e.g. sbatch --uid, REST); the
        -- quota still applies, so the name comes from the passwd database.
        view.user = env.user_name(view.uid)
        if view.user then
            log(env, "log_info", string.format("%sjob %s has no user_name; user_id %s is %s",
                LOG_PREFIX, job_label(view), int_str(view.uid), view.user))
        end
    end
    if not view.user then
        error("the job has no user_name and user_id " .. int_str(view.uid)
            .. " has no passwd entry")
    end
    local is_root = view.uid == 0
    view.account = view.account or ""
    local db = env.db
    db:exec("begin")
    local settings, factors = load_context(db)
    local r, bad = M.build_request(view, settings, factors)
    if not r then
        if not is_root then
            db:exec("rollback")
            return refuse(env, view, {
                string.format("%sjob %s refused: %s.", LOG_PREFIX, job_label(view), bad.message),
            }, RC_ERROR, bad.message)
        end
        -- root is never refused: reserve one element of one CPU, ignoring what is unreadable
        log(env, "log_error", string.format("%sroot job %s: %s; reserving 1 CPU", LOG_PREFIX,
            job_label(view), bad.message))
        r = M.build_request({ partitions = view.partitions, time = view.time, tres = {},
            exclusive = false }, settings, factors)
    end
    local ledgers = {
        user = load_ledger(db, "user", view.user, settings),
        account = load_ledger(db, "account", view.account, settings),
    }
    if not r.time then
        if M.quota_applies(r, ledgers) and not is_root then
            db:exec("rollback")
            return refuse(env, view, M.missing_time_lines({
                job_label = job_label(view),
                owner_label = string.format("user %s / account %s", view.user,
                    view.account ~= "" and view.account or "(none)"),
            }), RC_MISSING_TIME_LIMIT, "no time limit and a quota applies")
        end
        M.set_amounts(r, nil)
    end
    local fail = M.decide(r, ledgers)
    if fail and not is_root then
        db:exec("rollback")
        return refuse(env, view, M.refusal_lines(r, fail, { job_label = job_label(view) }),
            RC_ACCOUNTING_POLICY, string.format("%s %s quota: requested %s, available %s; %s",
                fail.owner, RESOURCES[fail.resource].label, int_str(fail.requested),
                int_str(fail.available), describe_request(r)))
    end
    ensure_owner(db, ledgers.user, settings)
    ensure_owner(db, ledgers.account, settings)
    local uuid = env.uuid()
    db:exec("insert_prealloc", uuid, view.user, view.account, toint(r.cpu_minutes),
        toint(r.gpu_minutes), toint(r.array_count), timestamp(env), M.cluster_name())
    db:exec("commit")
    local token = TOKEN_TAG .. uuid
    job_desc.admin_comment = M.append_token(view.admin_comment, token)
    if M.config.log_accepts then
        log(env, "log_info", string.format("%saccepted %s uuid=%s %s submit_uid=%s%s%s",
            LOG_PREFIX, job_ident(view), uuid, describe_request(r), int_str(submit_uid),
            view.het_offset and (" het_offset=" .. int_str(view.het_offset)) or "",
            (fail and " (root: over quota, not refused)") or ""))
    end
    return RC_SUCCESS
end

--- Per-minute rates (CPUs, GPU weight) of the current job, from its row when possible.
local function modify_rates(row, old_time, mv, settings, factors)
    local cur_r = M.build_request(mv.cur, settings, factors)
    local new_r, bad = M.build_request(mv.new, settings, factors)
    if not new_r then return nil, bad end
    local cpu_rate, gpu_rate
    if old_time and old_time > 0 then
        cpu_rate = row.cpu / old_time
        gpu_rate = row.gpu / old_time
    elseif cur_r then
        cpu_rate, gpu_rate = cur_r.cpus, cur_r.gpu_weight
    else
        cpu_rate, gpu_rate = new_r.cpus, new_r.gpu_weight
    end
    if mv.cpu_changed then cpu_rate = new_r.cpus end
    if mv.gpu_changed then gpu_rate = new_r.gpu_weight end
    return { cpu = cpu_rate, gpu = gpu_rate, new_r = new_r }
end

--- The rules of an update, without the database (pure): what the reservation of a job
--- becomes and which quotas must allow it. mv: read_modify()'s view; row: the job's
--- preallocation {user, account, cpu, gpu, array_size} (per element); is_admin: the updater is
--- root, SlurmUser or in ADMIN_UIDS. Returns a plan:
---   {action = "refuse", message}    the new request cannot be read (users only)
---   {action = "keep", reason, note} the reservation stays as it is
---   {action = "update", new_r, account, moved, only, note}: new per-element amounts in
---     new_r.cpu_minutes/gpu_minutes; `only` names the quotas to check ("user.cpu", ...;
---     empty for administrators), with the job's own reservation not counted as used.
function M.modify_rules(mv, row, settings, factors, is_admin)
    local privileged = is_admin or mv.uid == 0
    local old_time = M.resolve_time(mv.cur.time, mv.cur.partitions, settings.default_time_minutes)
    local rates, bad = modify_rates(row, old_time, mv, settings, factors)
    if not rates then
        if privileged then return { action = "keep", reason = bad.message, note = "" } end
        return { action = "refuse", message = bad.message }
    end
    local new_time = M.resolve_time(mv.new.time, mv.new.partitions, settings.default_time_minutes)
    local note = ""
    if not is_admin and old_time and (not new_time or new_time > old_time)
        and not M.user_may_raise_time(mv.pending, mv.new.time, new_time, mv.cur.partitions) then
        -- slurmctld denies this increase after the plugin ran (job running, or beyond
        -- MaxTime), so the row must not grow. (An operator not in ADMIN_UIDS whose increase
        -- slurmctld allows keeps the old reservation until the job is charged.)
        new_time = old_time
        note = " (time increase by a non-admin that slurmctld denies: reservation not grown)"
    end
    if not new_time then
        return { action = "keep", reason = "no finite time limit", note = note }
    end
    local new_r = rates.new_r
    new_r.cpus, new_r.gpu_weight, new_r.array_count = rates.cpu, rates.gpu, row.array_size
    M.set_amounts(new_r, new_time)
    local account = mv.account or row.account
    local moved = account ~= row.account
    local only = {}
    if not privileged then
        if new_r.cpu_minutes > row.cpu then only["user.cpu"] = true end
        if new_r.gpu_minutes > row.gpu then only["user.gpu"] = true end
        if moved or only["user.cpu"] then only["account.cpu"] = true end
        if moved or only["user.gpu"] then only["account.gpu"] = true end
    end
    if new_r.cpu_minutes == row.cpu and new_r.gpu_minutes == row.gpu and not moved then
        return { action = "keep", reason = "unchanged", note = note }
    end
    return { action = "update", new_r = new_r, account = account, moved = moved, only = only,
        note = note }
end

--- Check a plan's new request against the ledgers (pure): the job's own current reservation
--- is taken out of what its user (and its account, unless it moves) has reserved. Returns
--- decide()'s failure or nil.
function M.modify_check(plan, row, ledgers)
    local own_cpu, own_gpu = row.cpu * row.array_size, row.gpu * row.array_size
    local function exclude(l)
        l.reserved_cpu = math.max(l.reserved_cpu - own_cpu, 0)
        l.reserved_gpu = math.max(l.reserved_gpu - own_gpu, 0)
        l.open_jobs = math.max(l.open_jobs - row.array_size, 0)
    end
    if ledgers.user.name == row.user then exclude(ledgers.user) end
    if not plan.moved then exclude(ledgers.account) end
    return M.decide(plan.new_r, ledgers, plan.only)
end

--- slurm_job_modify with an injected env; raises on DB errors.
function M.modify(env, job_desc, job_rec, part_list, modify_uid)
    local mv = M.read_modify(job_desc, job_rec, part_list)
    local is_admin = env.is_admin(modify_uid)
    local uuid, token = M.find_token(mv.admin_comment_rec)
    -- An administrator rewriting AdminComment must not drop the token.
    if uuid and is_admin and type(mv.admin_comment_new) == "string"
        and not M.find_token(mv.admin_comment_new) then
        job_desc.admin_comment = M.append_token(mv.admin_comment_new, token)
        log(env, "log_info", string.format("%skept token %s in the new AdminComment of job %s",
            LOG_PREFIX, token, job_label(mv)))
    end
    if not uuid then return RC_SUCCESS end
    if not (mv.time_changed or mv.cpu_changed or mv.gpu_changed or mv.partition_changed
        or mv.account_changed) then
        return RC_SUCCESS -- hold, release, priority, name, ...: the reservation stays as it is
    end
    local db = env.db
    db:exec("begin")
    local rows = db:query("prealloc", uuid)
    if not rows[1] then
        db:exec("rollback")
        return RC_SUCCESS -- already charged or pruned
    end
    local rr = rows[1]
    local row = {
        user = rr[1], account = rr[2], cpu = num_or(rr[3], 0), gpu = num_or(rr[4], 0),
        array_size = num_or(rr[5], 1),
    }
    mv.user = mv.user or row.user
    local settings, factors = load_context(db)
    local plan = M.modify_rules(mv, row, settings, factors, is_admin)
    if plan.action == "refuse" then
        db:exec("rollback")
        log(env, "log_info", string.format("%srefused update of %s: %s", LOG_PREFIX,
            job_ident(mv), plan.message))
        pcall(env.slurm.log_user, "%s", string.format("%syour update of job %s was refused: %s",
            LOG_PREFIX, job_label(mv), plan.message))
        return RC_ERROR
    end
    if plan.action == "keep" then
        db:exec("rollback")
        log(env, "log_info", string.format("%supdate of %s: reservation %s unchanged (%s)%s",
            LOG_PREFIX, job_ident(mv), uuid, plan.reason, plan.note))
        return RC_SUCCESS
    end
    local new_r, new_account = plan.new_r, plan.account
    mv.account = new_account
    if next(plan.only) then
        local ledgers = {
            user = load_ledger(db, "user", mv.user, settings),
            account = load_ledger(db, "account", new_account, settings),
        }
        local fail = M.modify_check(plan, row, ledgers)
        if fail then
            db:exec("rollback")
            -- Slurm 23.02+ shows log_user of job_modify to the user (scontrol update prints
            -- it); 22.05 discards it, so the same lines go to slurmctld's log too.
            local lines = M.refusal_lines(new_r, fail, { job_label = job_label(mv) })
            for _, line in ipairs(lines) do
                log(env, "log_info", line)
                env.slurm.log_user("%s", line)
            end
            log(env, "log_info", string.format("%srefused update of %s: %s %s quota",
                LOG_PREFIX, job_ident(mv), fail.owner, RESOURCES[fail.resource].label))
            return RC_ACCOUNTING_POLICY
        end
        if plan.moved then ensure_owner(db, ledgers.account, settings) end
    elseif plan.moved then
        ensure_owner(db, load_ledger(db, "account", new_account, settings), settings)
    end
    db:exec("update_prealloc", new_account, toint(new_r.cpu_minutes), toint(new_r.gpu_minutes), uuid)
    db:exec("commit")
    log(env, "log_info", string.format("%supdated %s uuid=%s by uid %s: cpu_min %s -> %s, "
        .. "gpu_min %s -> %s, account %s -> %s%s", LOG_PREFIX, job_ident(mv), uuid,
        int_str(modify_uid), int_str(row.cpu), int_str(new_r.cpu_minutes), int_str(row.gpu),
        int_str(new_r.gpu_minutes), tostring(row.account), tostring(new_account), plan.note))
    return RC_SUCCESS
end

----------------------------------------------------------------------------------------------
-- 4. wiring: LuaDBI session, failure policy, entry points
----------------------------------------------------------------------------------------------

-- unreachable = the ledger's server could not be reached (probe, connect, lost
-- connection): the circuit breaker opens on it.
local function db_error(message, unreachable)
    return setmetatable({ db = true, message = message, unreachable = unreachable or false }, {
        __tostring = function(e) return e.message end,
    })
end

-- A session: one LuaDBI connection and its prepared statements by SQL name. A statement is
-- prepared on first use and re-executed afterwards (LuaDBI 0.7: execute() resets it and
-- re-binds), so a call on a cached connection prepares nothing. Statements live and die with
-- their connection: closing the session finalizes them first (sqlite3_close() leaves a
-- connection with unfinalized statements open, file descriptors and locks included).
local Session = {}
Session.__index = Session

-- libmariadb's messages when the connection is gone (CR_SERVER_LOST, CR_SERVER_GONE_ERROR,
-- CR_CONNECTION_ERROR, CR_CONN_HOST_ERROR): the server is unreachable, not merely busy.
local UNREACHABLE_PATTERNS = { "Lost connection", "server has gone away", "Can't connect",
    "Server has gone away", "Connection refused", "timed out" }

local function statement_error(name, err)
    local text = tostring(err)
    local unreachable = false
    for _, pat in ipairs(UNREACHABLE_PATTERNS) do
        if text:find(pat, 1, true) then unreachable = true end
    end
    return db_error(string.format("%s: %s", name, text), unreachable)
end

local function run(self, name, ...)
    local stmt = self.stmts[name]
    if not stmt then
        local err
        stmt, err = self.conn:prepare(self.sql[name])
        if not stmt then error(statement_error(name, err), 0) end
        self.stmts[name] = stmt
    end
    local ok, eerr = stmt:execute(...)
    if not ok then
        -- LuaDBI's next execute() of this statement would report the same error again
        -- (sqlite3_reset returns it): a statement that failed is never reused.
        self.stmts[name] = nil
        pcall(stmt.close, stmt)
        error(statement_error(name, eerr), 0)
    end
    return stmt
end

--- The rows of a query, as arrays. Always fetched to the end: the statement is then done
--- and keeps no read snapshot open on the cached connection between calls.
function Session:query(name, ...)
    local stmt = run(self, name, ...)
    local rows, n = {}, 0
    while true do
        local row = stmt:fetch(false)
        if not row then break end
        n = n + 1
        rows[n] = row
    end
    return rows
end

function Session:exec(name, ...)
    local stmt = run(self, name, ...)
    -- A statement that returned a row (PRAGMA busy_timeout = N does) is stepped to its end.
    -- (LuaDBI's MySQL driver raises on fetch() from a statement without a result set.)
    if self.kind == "sqlite" then
        while stmt:fetch(false) do end
    end
    if name == "begin" then
        self.in_txn = true
    elseif name == "commit" or name == "rollback" then
        self.in_txn = false
    end
    return true
end

--- Run a statement once without keeping it (connection set-up).
function Session:exec_once(name)
    self:exec(name)
    local stmt = self.stmts[name]
    self.stmts[name] = nil
    if stmt then pcall(stmt.close, stmt) end
end

function Session:close()
    if self.in_txn then pcall(self.exec, self, "rollback") end
    for _, stmt in pairs(self.stmts) do pcall(stmt.close, stmt) end
    self.stmts = {}
    if self.conn then pcall(self.conn.close, self.conn) end
    self.conn = nil
end

-- The configuration file's keys, by their canonical spelling (matched case-insensitively).
local CONF_KEYS = { "LedgerType", "LedgerPath", "StorageHost", "StoragePort", "StorageLoc",
    "StorageUser", "StoragePass", "StoragePassFile", "StorageTLS", "StorageTLSCA",
    "StorageTLSCert", "StorageTLSKey" }
local CONF_KEY_OF = {}
for _, k in ipairs(CONF_KEYS) do CONF_KEY_OF[k:lower()] = k end
local MAX_CONF_BYTES = 64 * 1024

--- The configuration file's path: M.config.conf_path, else $SLURM_QUOTA_CONF, else the default.
function M.conf_path()
    return M.config.conf_path or os.getenv(CONF_ENV) or DEFAULT_CONF_PATH
end

--- The keys of a configuration text (slurm.conf rules: Key=Value, case-insensitive keys,
--- `#` comments, `\#` a literal `#`), or nil and a message. A message never quotes a value
--- (a line may hold a password).
function M.parse_conf(text, source)
    local values = {}
    local number = 0
    for raw in (text .. "\n"):gmatch("([^\n]*)\n") do
        number = number + 1
        raw = raw:gsub("\r$", "")
        local line = raw:gsub("\\#", "\1"):gsub("#.*$", ""):gsub("\1", "#")
        line = trim(line)
        if line ~= "" then
            local key, value = line:match("^([^=]*)=(.*)$")
            key = key and trim(key)
            if not key or key == "" then
                return nil, string.format("%s, line %d: expected Key=Value", source, number)
            end
            local canonical = CONF_KEY_OF[key:lower()]
            if not canonical then
                return nil, string.format("%s, line %d: unknown key %s", source, number,
                    key:match("^[%w_]+$") and #key <= 40 and key or "(a key not shown)")
            end
            if values[canonical] then
                return nil, string.format("%s, line %d: %s is given twice", source, number,
                    canonical)
            end
            value = trim(value)
            if value == "" then
                return nil, string.format("%s, line %d: %s has no value", source, number,
                    canonical)
            end
            values[canonical] = value
        end
    end
    return values
end

local function read_small_file(path, what)
    local f = io.open(path, "rb")
    if not f then return nil end
    local text = f:read(MAX_CONF_BYTES + 1) or ""
    f:close()
    if #text > MAX_CONF_BYTES then
        error(db_error(string.format("the %s %s is larger than %s bytes", what, path,
            int_str(MAX_CONF_BYTES))), 0)
    end
    return text
end

local function conf_exists(path)
    local f = io.open(path, "rb")
    if f then
        f:close()
        return true
    end
    -- exists but unreadable (mode 0600, another owner) is an error, not "absent"
    local ok, posix_unistd = pcall(require, "posix.unistd")
    if ok and type(posix_unistd) == "table" and posix_unistd.access then
        return posix_unistd.access(path, "f") == 0
    end
    return os.rename(path, path) ~= nil
end

local function yes(value)
    local v = value:lower()
    if v == "yes" or v == "true" or v == "1" or v == "on" then return true end
    if v == "no" or v == "false" or v == "0" or v == "off" then return false end
    return nil
end

--- Where the ledger is, as the CLI decides it (slurm_quota.config.resolve): {kind = "sqlite",
--- path = ...} or {kind = "mariadb", host, port, database, user, password_file/password,
--- key}. M.config.db_path or $SLURM_QUOTA_DB name a SQLite file and override LedgerPath;
--- with LedgerType=mariadb they are an error. Raises a db error on a bad file.
--- ClusterName from slurm.conf (lower case, as Slurm keeps it), read once per Lua state (a
--- reconfigure loads a fresh one); "" when it cannot be read. The file: M.config.slurm_conf
--- (job_submit.lua names the slurm.conf beside it, the one slurmctld read it from), else
--- $SLURM_CONF, else /etc/slurm/slurm.conf. Only the main file is read: ClusterName in an
--- Include'd file is not found (then "", and a shared ledger's reconcile leaves this
--- cluster's orphans alone rather than guess).
local cluster_cache
function M.cluster_name()
    if cluster_cache then return cluster_cache end
    local name = ""
    for _, path in ipairs({ M.config.slurm_conf or false, os.getenv("SLURM_CONF") or false,
        "/etc/slurm/slurm.conf" }) do
        local fh = path and io.open(path, "r")
        if fh then
            for line in fh:lines() do
                local key, value = line:match("^%s*(%a+)%s*=%s*([^%s#]+)")
                if key and key:lower() == "clustername" then
                    name = value:lower()
                    break
                end
            end
            fh:close()
            break
        end
    end
    cluster_cache = name:sub(1, 255)
    return cluster_cache
end

--- Forget the cached ClusterName (tests).
function M.reset_cluster_name()
    cluster_cache = nil
end

function M.ledger()
    local db_option = M.config.db_path or os.getenv(DB_PATH_ENV)
    local source = M.conf_path()
    local text = read_small_file(source, "configuration file")
    if not text then
        if conf_exists(source) then
            error(db_error(string.format("the configuration file %s cannot be read by uid "
                .. "%s (it is meant to be owned by SlurmUser, mode 0600)", source,
                tostring(M.slurm_user_uid))), 0)
        end
        return { kind = "sqlite", path = db_option or DEFAULT_DB_PATH }
    end
    local v, err = M.parse_conf(text, source)
    if not v then error(db_error(err .. "; the file was not used"), 0) end
    local kind = (v.LedgerType or "sqlite"):lower()
    if kind == "sqlite" then
        for _, k in ipairs(CONF_KEYS) do
            if v[k] and k:sub(1, 7) == "Storage" then
                error(db_error(string.format("%s: %s only applies to LedgerType=mariadb",
                    source, k)), 0)
            end
        end
        return { kind = "sqlite", path = db_option or v.LedgerPath or DEFAULT_DB_PATH }
    end
    if kind ~= "mariadb" then
        error(db_error(source .. ": LedgerType must be sqlite or mariadb"), 0)
    end
    if db_option then
        error(db_error(string.format("%s says LedgerType=mariadb, but a SQLite file was also "
            .. "named (SLURM_QUOTA_DB: %s); remove the one that is wrong", source,
            db_option)), 0)
    end
    if not v.StorageUser then error(db_error(source .. ": LedgerType=mariadb needs StorageUser"), 0) end
    if v.StoragePass and v.StoragePassFile then
        error(db_error(source .. ": give StoragePass or StoragePassFile, not both"), 0)
    end
    if v.StorageTLS and yes(v.StorageTLS) ~= false then
        -- LuaDBI's MySQL driver sets no TLS option before mysql_real_connect().
        error(db_error(source .. ": StorageTLS=yes cannot be honoured by the plugin (LuaDBI's "
            .. "MySQL driver has no TLS settings); the plugin does not connect without it"), 0)
    end
    local port = tonumber(v.StoragePort or "3306")
    if not port or port ~= floor(port) or port < 1 or port > 65535 then
        error(db_error(source .. ": StoragePort must be a TCP port number from 1 to 65535"), 0)
    end
    local host = v.StorageHost or "localhost"
    local database = v.StorageLoc or "slurm_quota"
    return {
        kind = "mariadb", host = host, port = port, database = database,
        user = v.StorageUser, password = v.StoragePass, password_file = v.StoragePassFile,
        source = source,
        key = string.format("mariadb://%s@%s:%s/%s", v.StorageUser, host, int_str(port),
            database),
    }
end

--- The DB path of a SQLite ledger: M.config.db_path, else $SLURM_QUOTA_DB, else LedgerPath
--- of the configuration file, else the default.
function M.db_path()
    local ok, l = pcall(M.ledger)
    if ok and l.kind == "sqlite" then return l.path end
    return M.config.db_path or os.getenv(DB_PATH_ENV) or DEFAULT_DB_PATH
end

local function check_version(s, version)
    version = tonumber(version)
    if version ~= SCHEMA_VERSION then
        error(db_error(string.format("the database %s has schema version %s, this plugin "
            .. "knows %s (run `slurm-quota migrate`, or update the plugin)", s.path,
            tostring(version), int_str(SCHEMA_VERSION))), 0)
    end
end

local function check_schema(s)
    local v = s:query("user_version")[1]
    check_version(s, v and v[1])
end

local posix_stat

-- The file type bits of a st_mode (S_IFMT / 4096) without bit operators: 8 = regular file.
local function file_type(mode)
    return floor(mode / 4096) % 16
end

-- The ledger must exist and be a regular file before SQLite opens it: opening or reading a
-- FIFO blocks forever, and slurmctld holds its locks meanwhile. With luaposix nothing is
-- opened (stat, also of -wal/-shm); without it the file is opened read-write (which does not
-- block on a FIFO) and must be seekable, which a FIFO or a terminal is not.
local function check_exists(path)
    local missing = "the database " .. path .. " is missing or unreadable"
    if posix_stat then
        for _, suffix in ipairs({ "", "-wal", "-shm" }) do
            local st = posix_stat.stat(path .. suffix)
            if not st and suffix == "" then error(db_error(missing), 0) end
            if st and type(st.st_mode) == "number" and file_type(st.st_mode) ~= 8 then
                error(db_error("the database " .. path .. suffix .. " is not a regular file "
                    .. "(a FIFO, directory or device); it is not opened"), 0)
            end
        end
        return
    end
    local f = io.open(path, "r+b")
    if not f then error(db_error(missing), 0) end
    local size = f:seek("end")
    f:close()
    if not size then
        error(db_error("the database " .. path .. " is not a regular file (it cannot seek); "
            .. "it is not opened"), 0)
    end
end

--- Open the ledger: must exist, bounded lock wait, known schema. Raises a db error.
--- (The existence check opens the file: only ever call this with no cached connection to
--- it open, see M.session.)
function M.open_db(path)
    check_exists(path)
    local ok, DBI = pcall(require, "DBI")
    if not ok then error(db_error("LuaDBI is not installed (require \"DBI\" failed)"), 0) end
    local conn, err = DBI.Connect("SQLite3", path)
    if not conn then error(db_error("cannot open " .. path .. ": " .. tostring(err)), 0) end
    pcall(conn.autocommit, conn, true)
    local s = setmetatable({ conn = conn, path = path, in_txn = false, stmts = {}, sql = SQL,
        kind = "sqlite" }, Session)
    local okv, verr = pcall(function()
        s:exec_once("busy_timeout")
        s:exec_once("foreign_keys")
        s:exec_once("synchronous")
        s:exec_once("wal_autocheckpoint")
        check_schema(s)
    end)
    if not okv then
        s:close()
        error(verr, 0)
    end
    return s
end

----------------------------------------------------------------------------------------------
-- MariaDB: connection with a bounded stall (luaposix) and a circuit breaker
----------------------------------------------------------------------------------------------

local posix_net
do
    local ok1, sock = pcall(require, "posix.sys.socket")
    local ok2, fcntl = pcall(require, "posix.fcntl")
    local ok3, poll = pcall(require, "posix.poll")
    local ok4, unistd = pcall(require, "posix.unistd")
    local ok5, dirent = pcall(require, "posix.dirent")
    local ok6, ptime = pcall(require, "posix.time")
    if ok1 and ok2 and ok3 and ok4 and ok5 and ok6 and type(sock) == "table" and sock.connect
        and type(poll) == "table" and poll.poll then
        posix_net = { sock = sock, fcntl = fcntl, poll = poll, unistd = unistd,
            dirent = dirent, time = ptime }
    end
end
-- Linux's TCP_USER_TIMEOUT (netinet/tcp.h; luaposix has no name for it).
local TCP_USER_TIMEOUT = 18

--- Seconds on a monotonic clock (luaposix), else os.time().
function M.clock()
    if posix_net and posix_net.time.clock_gettime then
        local t = posix_net.time.clock_gettime(posix_net.time.CLOCK_MONOTONIC)
        if t then return t.tv_sec + t.tv_nsec / 1e9 end
    end
    return os.time()
end

-- The circuit breaker: after the server could not be reached, calls until down_until are
-- decided by the failure policy at once.
local breaker = { down_until = nil, reason = nil }
M.breaker = breaker

-- The numeric address of a host: "localhost" is 127.0.0.1 (as PyMySQL, and unlike
-- libmariadb, for which it means the local socket); a name is resolved once per connection
-- (getaddrinfo is not bounded: use an address or a name in /etc/hosts).
local function resolve_host(host, port)
    if host == "localhost" then return "127.0.0.1", posix_net.sock.AF_INET end
    if host:match("^%d+%.%d+%.%d+%.%d+$") then return host, posix_net.sock.AF_INET end
    local S = posix_net.sock
    local res, err = S.getaddrinfo(host, tostring(port), { family = S.AF_UNSPEC,
        socktype = S.SOCK_STREAM })
    if not res or not res[1] then
        error(db_error(string.format("cannot resolve the ledger's host %s: %s", host,
            tostring(err)), true), 0)
    end
    return res[1].addr, res[1].family
end

--- Is the MariaDB server at addr:port answering? Connects without blocking and waits at most
--- timeout_ms for its greeting (a server that accepts but hangs sends none). Raises a db
--- error saying why not.
function M.probe(addr, family, port, timeout_ms)
    local S, P, U, F = posix_net.sock, posix_net.poll, posix_net.unistd, posix_net.fcntl
    local fd, err = S.socket(family, S.SOCK_STREAM, 0)
    if not fd then error(db_error("socket(): " .. tostring(err), true), 0) end
    local ok, res = pcall(function()
        local flags = F.fcntl(fd, F.F_GETFL)
        F.fcntl(fd, F.F_SETFL, flags + F.O_NONBLOCK)
        local c, cerr, cerrno = S.connect(fd, { family = family, addr = addr, port = port })
        if not c and cerrno ~= require("posix.errno").EINPROGRESS then
            return "connect(): " .. tostring(cerr)
        end
        local fds = { [fd] = { events = { IN = true } } }
        local n = P.poll(fds, timeout_ms)
        if not n or n == 0 then
            return string.format("no greeting within %s ms", int_str(timeout_ms))
        end
        local data, rerr = S.recv(fd, 256)
        if not data or #data == 0 then
            return "no greeting: " .. tostring(rerr or "connection closed")
        end
        return nil
    end)
    U.close(fd)
    if not ok then error(db_error("probe: " .. tostring(res), true), 0) end
    if res then
        error(db_error(string.format("the ledger's server %s:%s is not answering (%s)", addr,
            int_str(port), res), true), 0)
    end
end

-- The descriptors of this process, as a set fd -> true (without the one that listed them).
local function open_fds()
    local out = {}
    local ok, names = pcall(posix_net.dirent.dir, "/proc/self/fd")
    if not ok or type(names) ~= "table" then return out end
    for _, name in ipairs(names) do
        local fd = tonumber(name)
        if fd and posix_net.fcntl.fcntl(fd, posix_net.fcntl.F_GETFD) then out[fd] = true end
    end
    return out
end

-- Socket inodes of this network namespace's established TCP connections (st 01) to remote
-- port `port`, as a set (/proc/net/tcp or tcp6: "sl local rem st ... uid timeout inode").
local function inodes_to(port, family)
    local out = {}
    -- one file only: reading one costs ~5 ms (the kernel walks its whole connection table)
    for _, path in ipairs({ family == posix_net.sock.AF_INET6 and "/proc/net/tcp6"
        or "/proc/net/tcp" }) do
        local f = io.open(path, "r")
        if f then
            for line in f:lines() do
                local rport, st, inode = line:match(
                    "^%s*%d+: %x+:%x+ %x+:(%x+) (%x+) %x+:%x+ %x+:%x+ %x+%s+%d+%s+%d+ (%d+)")
                if rport and tonumber(rport, 16) == port and st == "01" then
                    out[tonumber(inode)] = true
                end
            end
            f:close()
        end
    end
    return out
end

-- The open files of this process as a set of "device:inode" (stat through /proc/self/fd).
local function open_files()
    local out = {}
    for fd in pairs(open_fds()) do
        local st = posix_stat and posix_stat.stat("/proc/self/fd/" .. fd)
        if st then out[tostring(st.st_dev) .. ":" .. tostring(st.st_ino)] = true end
    end
    return out
end

-- Set TCP_USER_TIMEOUT on the socket libmariadb opened in DBI.Connect: a descriptor whose file
-- was not open `before` (open_files()) and whose socket inode (stat through /proc/self/fd) is
-- an established connection to the server's port. Files, not descriptor numbers: slurmctld's
-- other threads open and close descriptors meanwhile, and the connection may get a number
-- another file had a moment before (seen once on the lab right after `scontrol takeover`: no
-- socket found, the submission decided by the failure policy). LuaDBI does not expose the
-- socket, and luaposix 33.4 can not name it otherwise: it has no getpeername nor fstat, its
-- getsockname passes an uninitialised length (its answer changes from run to run), and its
-- readlink fails on /proc/self/fd links. Another thread's socket never matches both tests.
local function set_user_timeout(before, port, family)
    local S = posix_net.sock
    local inodes = inodes_to(port, family)
    local n = 0
    for fd in pairs(open_fds()) do
        local st = posix_stat and posix_stat.stat("/proc/self/fd/" .. fd)
        if st and inodes[st.st_ino]
            and not before[tostring(st.st_dev) .. ":" .. tostring(st.st_ino)] then
            if S.setsockopt(fd, S.IPPROTO_TCP, TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS) then
                n = n + 1
            end
        end
    end
    return n
end

local function read_password(ledger)
    if not ledger.password_file then return ledger.password end
    local text = read_small_file(ledger.password_file, "password file")
    if not text then
        error(db_error(string.format("%s: StoragePassFile %s cannot be read", ledger.source,
            ledger.password_file)), 0)
    end
    text = text:gsub("\r?\n$", "")
    return text
end

--- Open a MariaDB ledger: probe, connect, bound the socket and every statement, check the
--- schema version. Raises a db error (unreachable = true when the server could not be reached).
function M.open_mariadb(ledger)
    if not posix_net then
        error(db_error("a MariaDB ledger needs luaposix (lua-posix), without which the plugin "
            .. "cannot bound how long slurmctld waits for the server"), 0)
    end
    local ok, DBI = pcall(require, "DBI")
    if not ok then error(db_error("LuaDBI is not installed (require \"DBI\" failed)"), 0) end
    local addr, family = resolve_host(ledger.host, ledger.port)
    M.probe(addr, family, ledger.port, PROBE_MS)
    local before = open_files()
    local conn, err = DBI.Connect("MySQL", ledger.database, ledger.user, read_password(ledger),
        addr, ledger.port)
    if not conn then
        error(db_error(string.format("cannot connect to %s: %s", ledger.key, tostring(err)),
            true), 0)
    end
    pcall(conn.autocommit, conn, true)
    local s = setmetatable({ conn = conn, path = ledger.key, in_txn = false, stmts = {},
        sql = SQL_MARIADB, kind = "mariadb" }, Session)
    local okv, verr = pcall(function()
        if set_user_timeout(before, ledger.port, family) ~= 1 then
            -- without it, a query on a connection whose packets are dropped waits forever
            error(db_error("cannot find the connection's socket to set TCP_USER_TIMEOUT on it "
                .. "(/proc/self/fd, /proc/net/tcp): not used, as its wait would be unbounded"),
                0)
        end
        s:exec_once("isolation")
        s:exec_once("session")
        check_schema(s)
    end)
    if not okv then
        s:close()
        error(verr, 0)
    end
    return s
end

--- The name of a uid from the passwd database (luaposix), or nil.
function M.user_name_of(uid)
    if type(uid) ~= "number" then return nil end
    local ok, pwd = pcall(require, "posix.pwd")
    if not ok or type(pwd) ~= "table" or not pwd.getpwuid then return nil end
    local okp, pw = pcall(pwd.getpwuid, uid)
    if okp and type(pw) == "table" and type(pw.pw_name) == "string" and pw.pw_name ~= "" then
        return pw.pw_name
    end
    return nil
end

-- The identity of the DB file (device:inode) when luaposix is there, else nil.
do
    local ok, mod = pcall(require, "posix.sys.stat")
    if ok and type(mod) == "table" and mod.stat then posix_stat = mod end
end
local function file_id(path)
    if not posix_stat then return nil end
    local st = posix_stat.stat(path)
    if not st then return false end
    return tostring(st.st_dev) .. ":" .. tostring(st.st_ino)
end

local cached = { session = nil }

--- Drop the cached connection (after an error, or to force a reopen).
function M.drop_connection()
    if cached.session then cached.session:close() end
    cached.session = nil
end

--- A session on the ledger: the cached one when still valid, else a new one. Returns the
--- session, whether it is the cached one, and whether its schema version is still to be
--- checked (a reused connection: the caller checks it once, inside its write transaction;
--- a new one was checked by open_db).
function M.session()
    local ledger = M.ledger()
    local path = ledger.kind == "sqlite" and ledger.path or ledger.key
    local open = M.open_db
    if ledger.kind == "mariadb" then
        local now = M.clock()
        if breaker.down_until and now < breaker.down_until then
            -- not `unreachable`: answering from the breaker must not re-arm it
            error(db_error(string.format("the ledger %s was unreachable %.1f s ago (%s); not "
                .. "tried again for another %.1f s", ledger.key, now - breaker.since,
                breaker.reason, breaker.down_until - now)), 0)
        end
        open = function() return M.open_mariadb(ledger) end
    end
    if not M.config.cache_connection then return open(path), false, false end
    local c = cached.session
    if c then
        local now = os.time()
        local gone = ledger.kind == "sqlite" and posix_stat and file_id(path) ~= cached.id
        -- MariaDB: an idle connection is probed again (a dropped network is then found in
        -- PROBE_MS instead of at the kernel's retransmission timer)
        local idle = ledger.kind == "mariadb" and M.clock() - cached.used_at >= IDLE_REOPEN_S
        if cached.path ~= path or now - cached.opened_at >= REOPEN_S or now < cached.opened_at
            or gone or idle then
            M.drop_connection()
        else
            -- Never io.open() the file here: closing any other descriptor of the database
            -- file drops every POSIX lock this process holds on it, SQLite's included, and
            -- another process may then reset the WAL under the cached connection (seen on the
            -- lab as stale reads, then "database disk image is malformed"). Identity and
            -- existence come from stat() (luaposix) above; without it, from REOPEN_S.
            cached.used_at = M.clock()
            return c, true, true
        end
    end
    local s = open(path)
    cached.session, cached.path, cached.opened_at, cached.used_at = s, path, os.time(),
        M.clock()
    cached.id = ledger.kind == "sqlite" and file_id(path) or nil
    return s, true, false
end

--- Open the circuit breaker after err, when err says the ledger's server was unreachable.
function M.note_failure(err)
    if type(err) == "table" and err.unreachable then
        local now = M.clock()
        breaker.since, breaker.down_until, breaker.reason = now, now + M.config.retry_s,
            tostring(err.message)
        return true
    end
    return false
end

local urandom
-- Random bytes are read 64 UUIDs at a time: one read(2) per 64 submissions instead of one
-- each (a cold syscall inside slurmctld cost ~15 us). The bytes stay in this process only.
local random_pool, random_at = "", 1
local RANDOM_BATCH = 16 * 64
--- A version 4 UUID from /dev/urandom (never math.random).
function M.uuid4()
    if random_at + 15 > #random_pool then
        if not urandom then
            urandom = io.open("/dev/urandom", "rb")
            if not urandom then error("cannot open /dev/urandom") end
            pcall(urandom.setvbuf, urandom, "no")
        end
        local b = urandom:read(RANDOM_BATCH)
        if not b or #b ~= RANDOM_BATCH then
            pcall(urandom.close, urandom)
            urandom = nil
            error("short read from /dev/urandom")
        end
        random_pool, random_at = b, 1
    end
    local b = random_pool:sub(random_at, random_at + 15)
    random_at = random_at + 16
    return M.uuid_from_bytes(b)
end

-- SlurmUser = the uid slurmctld runs as (read once; no fork, no posix module needed).
local function process_uid()
    local f = io.open("/proc/self/status", "r")
    if not f then return nil end
    local text = f:read("*a") or ""
    f:close()
    return tonumber(text:match("\nUid:%s*(%d+)"))
end
M.slurm_user_uid = process_uid()

--- Is uid an administrator for job_modify (root, SlurmUser, or listed in admin_uids)?
function M.is_admin(uid)
    if uid == nil then return false end
    if uid == 0 or uid == M.slurm_user_uid then return true end
    for _, a in ipairs(M.config.admin_uids or {}) do
        if a == uid then return true end
    end
    return false
end

local function error_text(err)
    if type(err) == "table" and err.message then return tostring(err.message) end
    return tostring(err)
end

-- Identify the job in a log line even when the records misbehave.
local function safe_ident(job_desc, job_rec)
    local ok, text, uid = pcall(function()
        local d, j = getter(job_desc), getter(job_rec)
        local v = {
            user = string_field(d("user_name")),
            uid = count_field(d("user_id")) or count_field(j("user_id")),
            account = string_field(d("account")) or string_field(j("account"))
                or string_field(d("default_account")),
            job_name = string_field(d("name")) or string_field(j("name")),
            job_id = count_field(j("job_id")),
        }
        return job_ident(v), v.uid
    end)
    if ok then return text, uid end
    return "job=(unreadable)", nil
end

local function make_env()
    return {
        slurm = slurm,
        now = os.time,
        uuid = M.uuid4,
        is_admin = M.is_admin,
        user_name = M.user_name_of,
    }
end
M.make_env = make_env

-- The DB is opened on first use: updates that do not touch the reservation (hold,
-- release, priority, ...) never open it, so a DB outage cannot block them.
-- A reused connection's schema version is checked once per call, right after BEGIN
-- IMMEDIATE (from the version row of SQL.context when that is the first read, else by a
-- query of its own): inside the write transaction, so no migration can slip in between the check and
-- the reads, and without a read transaction of its own. (On an error the call fails and the
-- connection is dropped, see close.)
local Lazy = {}
Lazy.__index = Lazy

function Lazy:get()
    local s = self.session
    if not s then
        s, self.cached, self.unchecked = M.session()
        self.session = s
    end
    return s
end

--- Does this ledger lock owner rows (MariaDB) rather than the whole file (SQLite)?
function Lazy:locks_rows()
    return self:get().kind == "mariadb"
end

function Lazy:query(name, ...)
    local s = self:get()
    if self.unchecked and name == "context" then
        -- the version comes with the settings (SQL.context): no statement of its own
        self.unchecked = false
        local rows = s:query(name, ...)
        local version
        for _, row in ipairs(rows) do
            if row[1] == "v" then version = row[3] end
        end
        check_version(s, version)
        return rows
    end
    if self.unchecked then
        self.unchecked = false
        check_schema(s)
    end
    return s:query(name, ...)
end

function Lazy:exec(name, ...)
    local s = self:get()
    if self.unchecked and name ~= "begin" then
        self.unchecked = false
        check_schema(s)
    end
    -- after BEGIN the check waits for the first statement (Lazy:query: SQL.context carries
    -- the version)
    s:exec(name, ...)
    return true
end

-- ok = the call ended normally: a cached connection stays open (with no transaction).
function Lazy:close(ok)
    local s = self.session
    self.session = nil
    if not s then return end
    if s.in_txn then
        pcall(s.exec, s, "rollback")
        ok = false
    end
    if self.cached and ok then return end
    if self.cached then M.drop_connection() else s:close() end
end

local function lazy_db()
    return setmetatable({}, Lazy)
end

-- Run fn(env); close the DB on every path; apply the failure policy to errors.
local function guarded(kind, job_desc, job_rec, privileged, fn)
    local env = make_env()
    env.db = lazy_db()
    local ok, rc = pcall(fn, env)
    pcall(env.db.close, env.db, ok and type(rc) == "number")
    if not ok and type(rc) == "table" and rc.db and tostring(rc.message):find("Deadlock found",
        1, true) then
        -- MariaDB chose this transaction as a deadlock victim (two first submissions of a new
        -- owner): it was rolled back whole, so it is run once more.
        pcall(slurm.log_info, "%s", LOG_PREFIX .. kind .. ": deadlock victim, decided again: "
            .. error_text(rc))
        env = make_env()
        env.db = lazy_db()
        ok, rc = pcall(fn, env)
        pcall(env.db.close, env.db, ok and type(rc) == "number")
    end
    if ok and type(rc) == "number" then return rc end
    if not ok then M.note_failure(rc) end
    if ok then rc = "the plugin returned no decision" end
    local ident, uid = safe_ident(job_desc, job_rec)
    local reason = error_text(rc)
    local sl = slurm
    if M.config.fail_open or privileged or uid == 0 then
        pcall(sl.log_error, "%s", string.format("%s%s of %s ACCEPTED WITHOUT QUOTA CHECK "
            .. "(%s): %s", LOG_PREFIX, kind, ident, M.config.fail_open and "fail-open"
            or "admin/root", reason))
        return RC_SUCCESS
    end
    pcall(sl.log_error, "%s", string.format("%s%s of %s REFUSED (fail-closed): %s", LOG_PREFIX,
        kind, ident, reason))
    if kind == "submit" then
        pcall(sl.log_user, "%s", LOG_PREFIX .. "your job could not be checked against your "
            .. "CPU/GPU-minute quota (the quota database is unavailable), so it was not "
            .. "submitted. Please retry in a minute; if this persists, tell your administrators.")
    end
    return RC_ERROR
end

--- Submission entry point (also for sites composing their own job_submit.lua).
function M.job_submit(job_desc, part_list, submit_uid)
    return guarded("submit", job_desc, nil, false, function(env)
        return M.submit(env, job_desc, part_list, submit_uid)
    end)
end

--- Modification entry point (also for sites composing their own job_submit.lua).
function M.job_modify(job_desc, job_rec, part_list, modify_uid)
    local ok, admin = pcall(M.is_admin, modify_uid)
    return guarded("update", job_desc, job_rec, ok and admin, function(env)
        return M.modify(env, job_desc, job_rec, part_list, modify_uid)
    end)
end

return M
