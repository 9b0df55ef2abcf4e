"""Application Auto Scaling of an endpoint's variant: read, set, remove and put back."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cloudllm.console import Reporter
import cloudllm.providers.sagemaker.resources as res
from cloudllm.providers.sagemaker.session import aws_error

if TYPE_CHECKING:
    from cloudllm.plan import Plan


class SageMakerScaling:
    """The variant's scalable target and target-tracking policy."""

    # --- autoscaling ----------------------------------------------------------------------
    def _scaling_state(self, name: str) -> dict | None:
        """The variant's scalable target and policies, or None when it is not autoscaled."""
        rid = res.scaling_resource_id(name)
        targets = self._scaling.describe_scalable_targets(
            ServiceNamespace="sagemaker", ResourceIds=[rid], ScalableDimension=res.SCALABLE_DIMENSION
        )["ScalableTargets"]
        if not targets:
            return None
        policies = self._scaling.describe_scaling_policies(
            ServiceNamespace="sagemaker", ResourceId=rid, ScalableDimension=res.SCALABLE_DIMENSION
        )["ScalingPolicies"]
        return {"target": targets[0], "policies": policies}

    def _apply_scaling(self, plan: "Plan", reporter: Reporter) -> None:
        name = plan.spec.name
        if not res.autoscaled(plan):
            with self._aws(f"remove autoscaling of {name}"):
                self._remove_scaling(name)
            return
        rid = res.scaling_resource_id(name)
        policy = res.scaling_policy(plan)
        with self._aws(f"set up autoscaling of {name}"):
            self._scaling.register_scalable_target(
                ServiceNamespace="sagemaker",
                ResourceId=rid,
                ScalableDimension=res.SCALABLE_DIMENSION,
                MinCapacity=max(1, plan.spec.min_instances),
                MaxCapacity=plan.spec.max_instances,
            )
            self._scaling.put_scaling_policy(
                PolicyName=res.SCALING_POLICY,
                ServiceNamespace="sagemaker",
                ResourceId=rid,
                ScalableDimension=res.SCALABLE_DIMENSION,
                PolicyType="TargetTrackingScaling",
                TargetTrackingScalingPolicyConfiguration=policy,
            )
        metric = plan.spec.scale_metric or "invocations"
        reporter.step(
            f"autoscaling {max(1, plan.spec.min_instances)}-{plan.spec.max_instances} instances on "
            f"{res.SCALE_METRICS[metric][1]} (target {policy['TargetValue']:g})"
        )

    def _remove_scaling(self, name: str) -> bool:
        from botocore.exceptions import ClientError

        state = self._scaling_state(name)
        if state is None:
            return False
        for policy in state["policies"]:
            self._delete_unless_gone(lambda: self._scaling.delete_scaling_policy(
                PolicyName=policy["PolicyName"], ServiceNamespace="sagemaker",
                ResourceId=policy["ResourceId"], ScalableDimension=policy["ScalableDimension"],
            ))  # fmt: skip
        try:
            self._scaling.deregister_scalable_target(
                ServiceNamespace="sagemaker", ResourceId=res.scaling_resource_id(name), ScalableDimension=res.SCALABLE_DIMENSION
            )
        except ClientError as exc:
            if aws_error(exc)[0] != "ObjectNotFoundException":
                raise
        return True

    def _restore_scaling(self, state: dict) -> None:
        """Put back a scalable target and its policies removed for an update that then failed."""
        target = state["target"]
        keys = {k: target[k] for k in ("ServiceNamespace", "ResourceId", "ScalableDimension")}
        with self._aws("restore autoscaling"):
            self._scaling.register_scalable_target(**keys, MinCapacity=target["MinCapacity"], MaxCapacity=target["MaxCapacity"])
            for policy in state["policies"]:
                config = {k: v for k, v in policy.items() if k in ("StepScalingPolicyConfiguration", "TargetTrackingScalingPolicyConfiguration")}
                self._scaling.put_scaling_policy(PolicyName=policy["PolicyName"], PolicyType=policy["PolicyType"], **keys, **config)
