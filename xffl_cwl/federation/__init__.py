"""federation.yml: the one file a user writes, parsed into typed, validated objects."""

from xffl_cwl.federation.load import load_federation, parse_federation
from xffl_cwl.federation.spec import Deployment, FacilitySpec, FederationSpec, LocalDeployment, SlurmDeployment

__all__ = [
    "Deployment",
    "FacilitySpec",
    "FederationSpec",
    "LocalDeployment",
    "SlurmDeployment",
    "load_federation",
    "parse_federation",
]
