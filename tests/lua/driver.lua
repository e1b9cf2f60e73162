-- Drive lua/job_submit.lua under a real interpreter (lua5.1) with the real LuaDBI, the way
-- slurmctld does: proxy tables for job_desc/job_rec/part entries (pairs() yields nothing),
-- a slurm table with 22.05's constants, log functions that print.
-- usage: lua5.1 driver.lua PLUGIN CASES   (CASES is a Lua file returning a list of calls)
-- output: "CALL <n> rc=<rc> ms=<wall ms> admin_comment=<%q>" and "LOG <n> <level> <msg>" lines;
-- a case {kind = "shell", cmd = ...} runs cmd between two calls (another process touching the
-- ledger while the plugin's connection stays cached) and reports its exit status as rc; a case
-- {kind = "config", set = {...}} sets fields of the module's config table. At the
-- end the cached connection is dropped and "DBFDS <n>" gives the descriptors of this process
-- still open on the ledger's files (0 when the connection and its statements were closed).
local plugin_path, cases_path = arg[1], arg[2]

local current = 0
local function logger(level)
    return function(fmt, ...)
        local msg = string.format(fmt, ...)
        io.write(string.format("LOG %d %s %s\n", current, level, (msg:gsub("\n", "\\n"))))
    end
end
slurm = {
    SUCCESS = 0, ERROR = -1, FAILURE = -1, ESLURM_ACCOUNTING_POLICY = 2050,
    ESLURM_MISSING_TIME_LIMIT = 8000, ESLURM_INVALID_TIME_LIMIT = 2051,
    ESLURM_ACCESS_DENIED = 2002, NO_VAL = 4294967294, NO_VAL16 = 65534, NO_VAL8 = 254,
    NO_VAL64 = 1.844674407371e+19, INFINITE = 4294967295, INFINITE64 = 1.844674407371e+19,
    JOB_SHARED_NONE = 0, JOB_SHARED_OK = 1, JOB_SHARED_USER = 2, JOB_SHARED_MCS = 3,
    log_info = logger("info"), log_verbose = logger("verbose"), log_debug = logger("debug"),
    log_error = logger("error"), error = logger("error"), log_user = logger("user"),
    user_msg = logger("user"),
}

local function proxy(fields, writes)
    return setmetatable({}, {
        __index = function(_, k) return fields[k] end,
        __newindex = function(_, k, v) fields[k] = v; if writes then writes[k] = v end end,
    })
end

local clock
do
    local ok, ptime = pcall(require, "posix.time")
    if ok and ptime.clock_gettime then
        clock = function()
            local t = ptime.clock_gettime(ptime.CLOCK_MONOTONIC)
            return t.tv_sec + t.tv_nsec / 1e9
        end
    else
        clock = os.clock
    end
end

local before = {}
for k in pairs(_G) do before[k] = true end
local chunk = assert(loadfile(plugin_path))
local load_rc = chunk()
io.write(string.format("LOAD rc=%s\n", tostring(load_rc)))

local cases = dofile(cases_path)
local tokens = {}
for i, c in ipairs(cases) do
    current = i
    local parts = {}
    for _, p in ipairs(c.parts or {}) do parts[p.name] = proxy(p) end
    local writes = {}
    local rc
    local t0 = clock()
    if c.kind == "submit" then
        rc = slurm_job_submit(proxy(c.desc, writes), parts, c.uid or 1001)
    elseif c.kind == "config" then
        -- set the module's settings (e.g. {kind = "config", set = {retry_s = 1}})
        for k, v in pairs(c.set) do package.loaded.slurm_quota.config[k] = v end
        rc = 0
    elseif c.kind == "shell" then
        -- 5.1 returns the status; 5.2+ return true|nil, "exit", status
        local a, _, code = os.execute(c.cmd)
        rc = type(a) == "number" and a or code
    else
        local rec = c.rec
        if c.token_of then
            rec.admin_comment = tokens[c.token_of]
        end
        rc = slurm_job_modify(proxy(c.desc, writes), proxy(rec), parts, c.uid or 1001)
    end
    local ms = (clock() - t0) * 1000
    tokens[i] = writes.admin_comment
    io.write(string.format("CALL %d rc=%s ms=%.3f admin_comment=%q\n", i, tostring(rc), ms,
        tostring(writes.admin_comment)))
end

package.loaded.slurm_quota.drop_connection()
do
    local db = os.getenv("SLURM_QUOTA_DB")
    -- luaposix may be missing (Debian 12 has none for Lua 5.4): /proc/self is this process
    local ok, unistd = pcall(require, "posix.unistd")
    local pid
    if ok then
        pid = unistd.getpid()
    else
        local fh = io.open("/proc/self/stat")
        pid = fh:read("*l"):match("^(%d+)")
        fh:close()
    end
    local ls = io.popen("ls -l /proc/" .. tostring(pid) .. "/fd")
    local n = 0
    for line in ls:lines() do
        if db and line:find(" -> " .. db, 1, true) then n = n + 1 end
    end
    ls:close()
    io.write(string.format("DBFDS %d\n", n))
end

local leaked = {}
for k in pairs(_G) do if not before[k] then leaked[#leaked + 1] = k end end
table.sort(leaked)
io.write("GLOBALS " .. table.concat(leaked, ",") .. "\n")
