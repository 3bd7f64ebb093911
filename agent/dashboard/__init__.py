"""The live dashboard (`ernie-mesh dashboard`) and `ernie-mesh top`: a mesh read from Prometheus and Consul."""
