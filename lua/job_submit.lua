--[[
slurm-quota job_submit plugin (JobSubmitPlugins=lua): Slurm's two entry points, wired to the
module slurm_quota.lua, which holds all the logic (docs/plugin.md).

The module is looked for next to this file (its real directory, so a symlink
/etc/slurm/job_submit.lua -> /usr/share/slurm-quota/job_submit.lua works), then in
/usr/share/slurm-quota, then on package.path. slurmctld reloads this file when its mtime
changes, in a fresh Lua state, so the module is read again then: after upgrading
slurm_quota.lua alone, `touch` this file.

If the module cannot be loaded, every submission and modification is accepted (no quota
check) and the reason is logged on each call: a broken install must not stop the cluster.
--]]

local function module_dirs()
    local dirs = {}
    local info = debug and debug.getinfo and debug.getinfo(1, "S")
    local source = info and info.source or ""
    if source:sub(1, 1) == "@" then
        local path = source:sub(2)
        local ok, posix = pcall(require, "posix.stdlib")
        if ok and posix and posix.realpath then
            path = posix.realpath(path) or path
        end
        local dir = path:match("^(.*)/[^/]*$")
        if dir then dirs[#dirs + 1] = dir end
    end
    dirs[#dirs + 1] = "/usr/share/slurm-quota"
    return dirs
end

local function load_module()
    if package.loaded.slurm_quota then return true, package.loaded.slurm_quota end
    local tried = {}
    for _, dir in ipairs(module_dirs()) do
        local path = dir .. "/slurm_quota.lua"
        local fh = io.open(path, "r")
        if fh then
            fh:close()
            local chunk, err = loadfile(path)
            if not chunk then return false, err end
            local ok, mod = pcall(chunk)
            if not ok then return false, path .. ": " .. tostring(mod) end
            package.loaded.slurm_quota = mod
            return true, mod
        end
        tried[#tried + 1] = path
    end
    local ok, mod = pcall(require, "slurm_quota")
    if ok then return true, mod end
    return false, "slurm_quota.lua not found (tried " .. table.concat(tried, ", ")
        .. " and package.path): " .. tostring(mod)
end

local loaded, quota = load_module()

-- slurmctld reads this file from the directory of the slurm.conf it runs with: the module
-- takes ClusterName from that slurm.conf (the unresolved path, not the symlink's target).
if loaded then
    pcall(function()
        local source = debug.getinfo(1, "S").source
        local dir = source:sub(1, 1) == "@" and source:sub(2):match("^(.*)/[^/]*$")
        if dir then quota.config.slurm_conf = dir .. "/slurm.conf" end
    end)
end

local function broken(kind)
    pcall(slurm.log_error, "%s", "slurm-quota: " .. kind .. " ACCEPTED WITHOUT QUOTA CHECK "
        .. "(the plugin module could not be loaded): " .. tostring(quota))
    return slurm.SUCCESS
end

-- The module applies its failure policy to every error of its own; this is the last net, so
-- that no Lua error ever leaves an entry point (26.05 rejects the job when one does; 22.05
-- accepted it). The policy is the module's when it can still be read, else fail-open.
local function escaped(kind, err)
    local ok, fail_open = pcall(function() return quota.config.fail_open ~= false end)
    local accept = not ok or fail_open
    pcall(slurm.log_error, "%s", "slurm-quota: " .. kind .. (accept
        and " ACCEPTED WITHOUT QUOTA CHECK" or " REFUSED (fail-closed)")
        .. " (error in the plugin): " .. tostring(err))
    if accept then return slurm.SUCCESS end
    return slurm.ERROR
end

function slurm_job_submit(job_desc, part_list, submit_uid)
    if not loaded then return broken("submit") end
    local ok, rc = pcall(quota.job_submit, job_desc, part_list, submit_uid)
    if ok and type(rc) == "number" then return rc end
    return escaped("submit", ok and "no decision returned" or rc)
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
    if not loaded then return broken("update") end
    local ok, rc = pcall(quota.job_modify, job_desc, job_rec, part_list, modify_uid)
    if ok and type(rc) == "number" then return rc end
    return escaped("update", ok and "no decision returned" or rc)
end

if not loaded then
    pcall(slurm.log_error, "%s", "slurm-quota: plugin module not loaded: " .. tostring(quota))
end

return slurm.SUCCESS
