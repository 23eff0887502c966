"""Acting: dm_env environments, the batched acting loop, and (later) the robot client."""
