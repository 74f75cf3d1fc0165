-- wrk script: POST one sentence of a corpus file per request, cycling through the file.
--
--   wrk -t1 -c64 -d30s --timeout 10s -s benchmarks/wrk/corpus.lua URL -- CORPUS FIELD [MODEL]
--
-- CORPUS: a text file, one sentence per line (benchmarks/serving.py writes it).
-- FIELD:  the JSON key the sentence goes under ("input" for /v1/embeddings, "text" for echo);
--         "texts[]": the sentence goes in a one-item list under "texts" (a batched handler).
-- MODEL:  if given, also sends "model": MODEL (OpenAI shape).
-- Every request is built once in init(); request() only hands them out, so the Lua side
-- costs wrk almost nothing. There is no response() callback (it would slow wrk down):
-- non-2xx/3xx answers are wrk's own summary.errors.status ("Non-2xx or 3xx responses").
-- done() prints one line, "WRK_RESULT {json}", that serving.py parses.

local requests = {}
local count = 0
local index = 0

local escapes = { ['"'] = '\\"', ['\\'] = '\\\\', ['\b'] = '\\b', ['\f'] = '\\f',
                  ['\n'] = '\\n', ['\r'] = '\\r', ['\t'] = '\\t' }

local function json_string(s)
  local escaped = s:gsub('[%c"\\]', function(c)
    return escapes[c] or string.format('\\u%04x', c:byte())
  end)
  return '"' .. escaped .. '"'
end

function init(args)
  local path, field, model = args[1], args[2], args[3]
  if path == nil or field == nil then
    error("usage: wrk ... -s corpus.lua URL -- CORPUS FIELD [MODEL]")
  end
  local file = assert(io.open(path, "r"))
  local open, close = "", "}"
  if field:sub(-2) == "[]" then
    field, open, close = field:sub(1, -3), "[", "]}"
  end
  local prefix = "{"
  if model ~= nil and model ~= "" then
    prefix = prefix .. '"model":' .. json_string(model) .. ","
  end
  prefix = prefix .. json_string(field) .. ":" .. open
  -- no-store: the corpus cycles, and this benchmark measures the model path, not the
  -- response cache (benchmarks/cache.py measures that). X-Priority: batch: 64 connections
  -- sending back to back is a throughput workload; interactive traffic is held to a
  -- latency bound instead (benchmarks/overload.py measures that)
  local headers = { ["Content-Type"] = "application/json", ["Cache-Control"] = "no-store",
                    ["X-Priority"] = "batch" }
  for line in file:lines() do
    line = line:gsub("\r$", "")
    if line ~= "" then
      count = count + 1
      requests[count] = wrk.format("POST", nil, headers, prefix .. json_string(line) .. close)
    end
  end
  file:close()
  if count == 0 then
    error("corpus " .. path .. " has no sentences")
  end
  -- every thread starts at the first sentence: runs are repeatable
  index = 0
end

function request()
  index = index % count + 1
  return requests[index]
end

-- done(): the shared WRK_RESULT printer, next to this script
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "result.lua")
