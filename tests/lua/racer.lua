-- One of several real Lua interpreters racing for the last minutes of an account, each
-- standing for one slurmctld (a primary/backup pair, or two clusters) on one MariaDB ledger.
-- usage: lua5.1 racer.lua PLUGIN USER ROUNDS START_EPOCH STEP_MS ACCOUNT_PREFIX MINUTES
-- Round r (1..ROUNDS) starts at START_EPOCH + (r - 1) x STEP_MS on the real-time clock, the
-- same instant in every racer; each then submits one job of MINUTES CPU-minutes (1 CPU x
-- MINUTES) for account ACCOUNT_PREFIX<r> (a prefix ending in "=" names one account for
-- every round). Output per round: "R <r> rc=<rc> ms=<ms> uuid=<reservation or ->".
local plugin_path, user, rounds, start, step_ms, prefix, minutes =
    arg[1], arg[2], tonumber(arg[3]), tonumber(arg[4]), tonumber(arg[5]), arg[6], tonumber(arg[7])

local ptime = require("posix.time")
local function now()
    local t = ptime.clock_gettime(ptime.CLOCK_REALTIME)
    return t.tv_sec + t.tv_nsec / 1e9
end
local function sleep_until(t)
    local d = t - now()
    if d > 0 then
        ptime.nanosleep({ tv_sec = math.floor(d), tv_nsec = math.floor((d % 1) * 1e9) })
    end
end

local function logger(fmt, ...)
    local msg = string.format(fmt, ...)
    if msg:find("ACCEPTED WITHOUT", 1, true) or msg:find("REFUSED", 1, true)
        or msg:find("decided again", 1, true) then
        io.stderr:write(msg, "\n")
    end
end
slurm = {
    SUCCESS = 0, ERROR = -1, FAILURE = -1, ESLURM_ACCOUNTING_POLICY = 2050,
    ESLURM_MISSING_TIME_LIMIT = 8000, NO_VAL = 4294967294, NO_VAL16 = 65534,
    INFINITE = 4294967295, log_info = logger, log_verbose = logger, log_debug = logger,
    log_error = logger, error = logger, log_user = logger, user_msg = logger,
}
local function proxy(fields)
    return setmetatable({}, {
        __index = function(_, k) return fields[k] end,
        __newindex = function(_, k, v) fields[k] = v end,
    })
end

assert(loadfile(plugin_path))()
-- the connection is opened (and cached) before the first round, as in a running slurmctld
package.loaded.slurm_quota.session()

for r = 1, rounds do
    sleep_until(start + (r - 1) * step_ms / 1000)
    local t0 = now()
    local desc = {
        user_name = user, user_id = 1001, name = "race" .. r,
        account = prefix:sub(-1) == "=" and prefix:sub(1, -2) or prefix .. r,
        time_limit = minutes, min_cpus = 1, num_tasks = 1,
    }
    local rc = slurm_job_submit(proxy(desc), {}, 1001)
    local ms = (now() - t0) * 1000
    local uuid = desc.admin_comment and desc.admin_comment:match("slurm%-quota:(%S+)") or "-"
    io.write(string.format("R %d rc=%s ms=%.3f uuid=%s\n", r, tostring(rc), ms, uuid))
    io.flush()
end
