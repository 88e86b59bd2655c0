"""The paper's experiment end to end: drop counts x strategies x healed/unhealed, then figures."""
