"""livetalk-ray: train and serve real-time talking avatars with the LiveTalk recipe on Ray."""
