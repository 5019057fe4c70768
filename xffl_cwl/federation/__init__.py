"""federation.yml: the one file a user writes, parsed into typed, validated objects."""

from xffl_cwl.federation.load import load_federation, parse_federation
from xffl_cwl.federation.spec import (
    AggregationSettings,
    Deployment,
    FacilitySpec,
    FederationSpec,
    LocalDeployment,
    TrainingSettings,
)

__all__ = [
    "AggregationSettings",
    "Deployment",
    "FacilitySpec",
    "FederationSpec",
    "LocalDeployment",
    "TrainingSettings",
    "load_federation",
    "parse_federation",
]
