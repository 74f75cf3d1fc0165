-- wrk script for benchmarks/cache.py: POST prepared JSON bodies, one per line of a file.
--
--   wrk -t1 -c32 -d10s --timeout 10s -s benchmarks/cache_bodies.lua URL -- BODIES OFFSET THREADS [HEADER ...]
--
-- BODIES:  a file with one complete JSON body per line (cache.py writes it: one fixed echo
--          body, or ~50k risk `score` requests for Zipf-distributed accounts).
-- OFFSET:  the 0-based line to start at, so a measured run continues where its warm-up
--          stopped instead of replaying the same accounts.
-- THREADS: the -t value; thread k sends lines OFFSET+k, OFFSET+k+THREADS, … (no line is
--          sent twice until the file wraps, whatever -t is).
-- HEADER:  extra request headers as "Name: value", e.g. "Cache-Control: no-store".
-- Requests are built once in init(); there is no response() callback (it would slow wrk):
-- non-2xx/3xx answers are wrk's own summary.errors.status. done() (from wrk/result.lua) prints the same
-- "WRK_RESULT {json}" line as wrk/corpus.lua.

local requests = {}
local count = 0
local index = 0
local step = 1
local counter = 0

function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

function init(args)
  local path, offset, threads = args[1], tonumber(args[2] or "0"), tonumber(args[3] or "1")
  if path == nil then
    error("usage: wrk ... -s cache_bodies.lua URL -- BODIES OFFSET THREADS [HEADER ...]")
  end
  local headers = { ["Content-Type"] = "application/json" }
  for i = 4, #args do
    local name, value = args[i]:match("^([^:]+):%s*(.*)$")
    if name == nil then
      error("header must be 'Name: value', got " .. args[i])
    end
    headers[name] = value
  end
  local file = assert(io.open(path, "r"))
  for line in file:lines() do
    line = line:gsub("\r$", "")
    if line ~= "" then
      count = count + 1
      requests[count] = wrk.format("POST", nil, headers, line)
    end
  end
  file:close()
  if count == 0 then
    error("bodies file " .. path .. " is empty")
  end
  step = threads
  index = offset + (tid or 0)
end

function request()
  local r = requests[index % count + 1]
  index = index + step
  return r
end

-- done(): the shared WRK_RESULT printer, next to this script
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "wrk/result.lua")
