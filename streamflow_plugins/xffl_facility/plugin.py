"""Entry point `unito.streamflow.plugin` -> this class registers the xffl-facility connector."""

from __future__ import annotations

from streamflow.ext.plugin import StreamFlowPlugin

from streamflow_plugins.xffl_facility.connector import XfflFacilityConnector
from xffl_cwl.contract.layout import FACILITY_CONNECTOR


class XfflPlugin(StreamFlowPlugin):
    def register(self) -> None:
        self.register_connector(FACILITY_CONNECTOR, XfflFacilityConnector)
