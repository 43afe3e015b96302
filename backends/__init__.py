"""The paiton torch.compile backend: options, the backend function, fusion reports."""
