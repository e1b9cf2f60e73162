-- Benchmark driver: time slurm_job_submit of lua/job_submit.lua under the real lua5.1 +
-- LuaDBI, as slurmctld calls it (proxy job_desc, part_list keyed by name).
-- usage: lua5.1 plugin_latency_driver.lua PLUGIN USERS_FILE N WARMUP
-- prints one line per measured call: "<microseconds> <rc>", then "PREPARES <per call>" (the
-- statements the plugin prepared per call over 100 further calls, counted outside the timed
-- loop), then "OPEN <microseconds>" lines (open + schema check + close of a lone connection:
-- what an uncached call would pay; MariaDB: the greeting probe, connect, session settings).
-- The ledger is the plugin's: SLURM_QUOTA_DB (SQLite) or SLURM_QUOTA_CONF (MariaDB).
local plugin_path, users_file, n, warmup = arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4])
local ptime = require "posix.time"
local function now()
    local t = ptime.clock_gettime(ptime.CLOCK_MONOTONIC)
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3
end
local function nop() end
slurm = { SUCCESS = 0, ERROR = -1, ESLURM_ACCOUNTING_POLICY = 2050,
    ESLURM_MISSING_TIME_LIMIT = 8000, NO_VAL = 4294967294, NO_VAL16 = 65534,
    INFINITE = 4294967295, log_info = nop, log_error = function(fmt, ...)
        io.stderr:write(string.format(fmt, ...), "\n") end,
    log_user = nop, log_verbose = nop, log_debug = nop }
assert(loadfile(plugin_path))()
local slurm_quota = package.loaded.slurm_quota

local users = {}
for line in io.lines(users_file) do
    local u, a = line:match("^(%S+) (%S+)$")
    users[#users + 1] = { u, a }
end
local function proxy(fields)
    return setmetatable({}, { __index = fields, __newindex = function(_, k, v) fields[k] = v end })
end
local part = proxy({ name = "main", default_time = 30, max_time = 240, total_cpus = 16,
    total_nodes = 1, flag_default = 1 })
local function job(i)
    local u = users[(i * 7919) % #users + 1]
    return {
        user_id = 1000 + i % 50000, user_name = u[1], default_account = u[2],
        time_limit = 60, min_cpus = 4, num_tasks = 4, cpus_per_task = 65534,
        min_nodes = 4294967294, ntasks_per_node = 65534, pn_min_cpus = 65534,
        sockets_per_node = 65534, shared = 65534, het_job_offset = 4294967294,
        tres_per_job = (i % 4 == 0) and "gres:gpu:h100:1" or nil, name = "bench",
    }
end
for i = 1, warmup do
    slurm_job_submit(proxy(job(i)), { main = part }, 0)
end
local out = {}
for i = 1, n do
    local jd = proxy(job(warmup + i))
    local parts = { main = part }
    local t0 = now()
    local rc = slurm_job_submit(jd, parts, 0)
    out[#out + 1] = string.format("%.1f %d", now() - t0, rc)
end

-- Count prepares (not timed): wrap the method table shared by LuaDBI's connections of the
-- ledger's driver, found through the plugin's own cached connection (never a second handle).
do
    local methods = getmetatable(slurm_quota.session().conn).__index
    local real_prepare, prepares = methods.prepare, 0
    methods.prepare = function(...)
        prepares = prepares + 1
        return real_prepare(...)
    end
    for i = 1, 100 do
        slurm_job_submit(proxy(job(warmup + n + i)), { main = part }, 0)
    end
    methods.prepare = real_prepare
    out[#out + 1] = string.format("PREPARES %.2f", prepares / 100)
end

local ledger = slurm_quota.ledger()
local function open()
    if ledger.kind == "mariadb" then return slurm_quota.open_mariadb(ledger) end
    return slurm_quota.open_db(ledger.path)
end
-- never open a second descriptor of the file while the cached connection holds its locks
slurm_quota.drop_connection()
for _ = 1, 200 do
    local t0 = now()
    local s = open()
    s:close()
    out[#out + 1] = string.format("OPEN %.1f", now() - t0)
end
io.write(table.concat(out, "\n"), "\n")
