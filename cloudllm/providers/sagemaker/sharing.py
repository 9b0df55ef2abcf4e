"""The reservations of an endpoint's inference components, read for the plan's fit-together check.

The arithmetic (placement, cost per model, the fix) is cloudllm.fit.sharing's; this mixin only
says what SageMaker holds: the endpoint's instance type and MaxInstanceCount, and each model
component's ComputeResourceRequirements and desired copies, plus what the plan's own component
will reserve (components.compute_requirements).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloudllm.providers.sagemaker.components import compute_requirements, model_component, uses_components

if TYPE_CHECKING:
    from cloudllm.fit.sharing import SharedFit
    from cloudllm.plan import Plan


class SageMakerSharing:
    """shared_fit (mixed into SageMakerProvider)."""

    def shared_fit(self, plan: "Plan") -> "SharedFit | None":
        """Do the endpoint's components, the plan's included, fit its instances together? None where no components are involved
        or the instance is not in the catalog."""
        from cloudllm.catalog.instances import lookup
        from cloudllm.fit.sharing import ComponentReservation, fit_together

        spec, existing = plan.spec, plan.existing
        hosted = bool(existing and existing.details.get("inference_components"))
        if not (uses_components(spec) or hosted):
            return None
        name = spec.name
        instance_type, max_instances = self._instance(spec), max(1, spec.max_instances)
        mine = model_component(name, self._model_key(plan))
        others: list[ComponentReservation] = []
        if hosted:
            with self._aws(f"read the inference components of {name}"):
                config = self._sm.describe_endpoint_config(EndpointConfigName=existing.details["endpoint_config"])
                variant = config["ProductionVariants"][0]
                scaling = variant.get("ManagedInstanceScaling") or {}
                instance_type = variant.get("InstanceType") or instance_type
                if scaling.get("Status") == "ENABLED" and scaling.get("MaxInstanceCount"):
                    max_instances = int(scaling["MaxInstanceCount"])
                for component in self._components(name):
                    specification = component["Specification"]
                    if specification.get("BaseInferenceComponentName") or component["InferenceComponentName"] == mine:
                        continue  # adapters ride on their base's reservation; the plan's own is replaced by its new one
                    needs = specification.get("ComputeResourceRequirements") or {}
                    others.append(ComponentReservation(
                        component=component["InferenceComponentName"],
                        model=component["InferenceComponentName"][len(name) + 1 :],
                        copies=int((component.get("RuntimeConfig") or {}).get("DesiredCopyCount") or 0),
                        accelerators=float(needs.get("NumberOfAcceleratorDevicesRequired") or 0),
                        memory_mb=int(needs.get("MinMemoryRequiredInMb") or 0),
                        cpu_cores=float(needs.get("NumberOfCpuCoresRequired") or 0),
                    ))  # fmt: skip
        instance = lookup("sagemaker", instance_type)
        if instance is None:
            return None
        needs = compute_requirements(plan, instance_type)
        own = ComponentReservation(
            component=mine,
            model=self._model_key(plan),
            copies=max(1, spec.min_instances),
            accelerators=float(needs.get("NumberOfAcceleratorDevicesRequired") or 0),
            memory_mb=int(needs["MinMemoryRequiredInMb"]),
            cpu_cores=float(needs.get("NumberOfCpuCoresRequired") or 0),
            planned=True,
            adapters_bytes=plan.fit.memory.adapters_bytes if plan.fit and plan.fit.memory else 0,
        )
        return fit_together(instance, max_instances, [*others, own], endpoint=name)
