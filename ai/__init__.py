"""AI providers: a narrow streaming interface, the offline tutor, and the hosted-model clients."""
