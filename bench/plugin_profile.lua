-- Profiling wiring for `bench/plugin_latency.py --ctld-profile`: installed as the lab's
-- job_submit.lua (slurm_quota.lua beside it), it runs the real module inside slurmctld and
-- measures the calling thread's CPU time (CLOCK_THREAD_CPUTIME_ID, luaposix) of the whole
-- job_submit call and of its parts: the module's public functions, each SQL statement by
-- name, slurm.log_info and the session lookup. Every PROFILE_EVERY calls (10) it rewrites
-- <lab>/log/plugin-profile.tsv: "<part>\t<microseconds per call>\t<calls>". The parts
-- overlap (submit contains read_submit, which contains read_partitions, ...). Each timed part
-- adds two clock_gettime calls (about 1 us here), so the figures are upper bounds.
local PROFILE_EVERY = 10

local source = debug.getinfo(1, "S").source
local dir = source:match("^@(.*)/[^/]*$") or "."
local out_path = (dir:match("^(.*)/etc$") or dir) .. "/log/plugin-profile.tsv"
package.path = dir .. "/?.lua;" .. package.path
local quota = require("slurm_quota")
local ptime = require("posix.time")

local function cpu()
    local t = ptime.clock_gettime(ptime.CLOCK_THREAD_CPUTIME_ID)
    return t.tv_sec + t.tv_nsec / 1e9
end

local acc, hits, calls = {}, {}, 0
local function add(part, seconds)
    acc[part] = (acc[part] or 0) + seconds
    hits[part] = (hits[part] or 0) + 1
end

local function timed(part, fn)
    return function(...)
        local t0 = cpu()
        local a, b, c, d = fn(...)
        add(part, cpu() - t0)
        return a, b, c, d
    end
end

for _, name in ipairs({ "submit", "read_submit", "read_partitions", "build_request",
    "resolve_cpus", "resolve_gpus", "resolve_time", "parse_gpus", "parse_array_inx",
    "set_amounts", "decide", "uuid4", "uuid_from_bytes", "append_token", "db_path" }) do
    if type(quota[name]) == "function" then quota[name] = timed(name, quota[name]) end
end

local session = quota.session
quota.session = function(...)
    local t0 = cpu()
    local s, cached, unchecked = session(...)
    add("session (reuse checks, open)", cpu() - t0)
    if not s.profiled then
        local query, exec = s.query, s.exec
        s.query = function(self, name, ...)
            local t = cpu()
            local r = query(self, name, ...)
            add("sql " .. name, cpu() - t)
            return r
        end
        s.exec = function(self, name, ...)
            local t = cpu()
            local r = exec(self, name, ...)
            add("sql " .. name, cpu() - t)
            return r
        end
        s.profiled = true
    end
    return s, cached, unchecked
end

local log_info = slurm.log_info
slurm.log_info = function(...)
    local t0 = cpu()
    log_info(...)
    add("slurm.log_info", cpu() - t0)
end

local function write()
    local fh = io.open(out_path, "w")
    if not fh then return end
    for part, seconds in pairs(acc) do
        fh:write(string.format("%s\t%.1f\t%d\n", part, seconds * 1e6 / calls, hits[part]))
    end
    fh:close()
end

function slurm_job_submit(job_desc, part_list, submit_uid)
    local t0 = cpu()
    local rc = quota.job_submit(job_desc, part_list, submit_uid)
    add("TOTAL job_submit", cpu() - t0)
    calls = calls + 1
    if calls % PROFILE_EVERY == 0 then write() end
    return rc
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    return quota.job_modify(job_desc, job_rec, part_list, modify_uid)
end

return slurm.SUCCESS
