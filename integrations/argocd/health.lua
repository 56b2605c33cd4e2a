-- Argo CD health for Kiln's ImageTemplate and ImageBuildRun, read from the kstatus
-- conditions Kiln writes: Stalled -> Degraded, Ready -> Healthy, otherwise Progressing.
-- Install: resource.customizations.health.kiln.dev_ImageTemplate and
-- resource.customizations.health.kiln.dev_ImageBuildRun in argocd-cm (README).
local health = {status = "Progressing", message = "Waiting for Kiln to observe the resource"}
if obj.status == nil or obj.status.conditions == nil then
  return health
end
local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if generation ~= nil and observed ~= nil and observed < generation then
  health.message = "Waiting for Kiln to observe generation " .. tostring(generation)
  return health
end
local found = {}
for _, condition in ipairs(obj.status.conditions) do
  found[condition.type] = condition
end
if found.Stalled ~= nil and found.Stalled.status == "True" then
  health.status = "Degraded"
  health.message = found.Stalled.message
elseif found.Ready ~= nil and found.Ready.status == "True" then
  health.status = "Healthy"
  health.message = found.Ready.message
elseif found.Reconciling ~= nil and found.Reconciling.status == "True" then
  health.message = found.Reconciling.message
end
return health
